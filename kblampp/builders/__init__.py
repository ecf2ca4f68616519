"""Real-dataset builders (T-REx, HotpotQA, TimeQA) to 5-tuple and QA JSONL (SPEC sections 4 and 5).

Each `build_*` function returns a `common.BuildResult`; `common.finish` reports and writes atomically.
"""
