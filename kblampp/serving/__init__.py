"""HTTP serving of a KBLaM++ model (SPEC section 8): answers with evidence chains and live KB edits.

`app.create_app(engine, settings)` builds the FastAPI app; `engine.Engine` owns the model, the store
and the write-ahead log (`kb_log.KBLog`) behind one first-come lock: concurrent questions run together
as one batched generate() (`batcher.Batcher`), and a batch never interleaves with a KB edit.
"""
