"""Backbone loading from local folders (tiny random Llama / Qwen2 + a tiny ChatML tokenizer), the
d_model / inject-layer checks, pad tokens, the shared prompt builder and the embedded-model cache."""
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kblampp import embedded, hf_arch
from kblampp.backbone import (SHORT_ANSWER_INSTRUCTION, build_prompt, check_backbone, end_of_turn_id,
                              ensure_pad_token, load_backbone, resolve_backbone_source)
from kblampp.config import ConfigError, KBConfig
from kblampp.schema import fact_from_dict
from tiny_models import TINY_MODELS, VOCAB

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 = tiny models' pad, bos, eos
CORPUS = ["Who is the chief executive officer of BrightSky Robotics?",
          "Alice Zhang became the CEO of BrightSky Robotics on March 2, 2019.",
          "Answer the question with only the answer itself.", "system user assistant",
          "Where was the person born? In which year did it happen?"]


def tiny_chat_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE with exactly the tiny models' vocab size (300) and a ChatML chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    extra = {"pad_token": "<|endoftext|>"} if pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", **extra)
    fast.chat_template = CHATML
    return fast


def save_tiny(tmp_path: Path, arch: str, pad: bool = True) -> Path:
    folder = tmp_path / f"tiny-{arch}"
    TINY_MODELS[arch]().save_pretrained(folder)
    tiny_chat_tokenizer(pad=pad).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_local_path_loads_same_model_and_tokenizer(tmp_path, arch):
    folder = save_tiny(tmp_path, arch, pad=False)
    model, tok = load_backbone(KBConfig(backbone=str(folder), inject_layers=[0, 1], d_model=64))
    x = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    original = TINY_MODELS[arch]()
    got, want = model.state_dict(), original.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():  # same weights; the loaded model may pick sdpa instead of eager attention
        torch.testing.assert_close(model(input_ids=x).logits, original(input_ids=x).logits, rtol=0, atol=1e-5)
    assert hf_arch.model_type(model) == arch and not model.training
    # no pad in the saved tokenizer: the dedicated <|endoftext|> is chosen, never the end-of-turn
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0 != end_of_turn_id(tok) == 2
    assert tok.padding_side == "left" and model.generation_config.pad_token_id == 0
    assert tok.chat_template == CHATML


def test_config_d_model_that_disagrees_is_a_clear_error(tmp_path):
    folder = save_tiny(tmp_path, "llama")
    with pytest.raises(ConfigError) as err:
        load_backbone(KBConfig(backbone=str(folder), inject_layers=[1], d_model=2048))
    assert str(err.value) == (f"d_model: config says 2048 but backbone {str(folder)!r} has hidden size 64; "
                              "remove d_model from the config or set it to 64")


@pytest.mark.parametrize("layers,bad_pos,bad", [([0, 2], 1, 2), ([-1], 0, -1)])
def test_inject_layer_out_of_range_is_a_clear_error(tmp_path, layers, bad_pos, bad):
    folder = save_tiny(tmp_path, "qwen2")
    with pytest.raises(ConfigError) as err:
        load_backbone(KBConfig(backbone=str(folder), inject_layers=layers))
    assert str(err.value) == (f"inject_layers[{bad_pos}]: layer {bad} is out of range for backbone "
                              f"{str(folder)!r} with 2 layers (valid: 0..1)")


def test_check_backbone_accepts_a_model_and_rejects_duplicates():
    model = TINY_MODELS["llama"]()
    check_backbone(KBConfig(inject_layers=[1], d_model=64), model)  # no error
    with pytest.raises(ConfigError, match=r"inject_layers: duplicate layer in \[1, 1\]"):
        check_backbone(KBConfig(inject_layers=[1, 1]), model)
    with pytest.raises(ConfigError, match="inject_layers: empty"):
        check_backbone(KBConfig(inject_layers=[]), model)


def test_bad_settings_are_clear_errors(tmp_path):
    folder = save_tiny(tmp_path, "llama")
    with pytest.raises(ConfigError, match=r"quantization: '8bit' is not supported \(use null or '4bit'\)"):
        load_backbone(KBConfig(backbone=str(folder), inject_layers=[1], quantization="8bit"))
    with pytest.raises(ConfigError, match="dtype: 'float64' is not one of"):
        load_backbone(KBConfig(backbone=str(folder), inject_layers=[1], dtype="float64"))
    missing = tmp_path / "nope" / "model"
    with pytest.raises(ConfigError, match=f"backbone: local path {str(missing)!r} does not exist"):
        resolve_backbone_source(KBConfig(backbone=str(missing)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_backbone_source(KBConfig(backbone=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"unknown embedded model 'embedded:gpt5' \(known: embedded:smollm2"):
        resolve_backbone_source(KBConfig(backbone="embedded:gpt5"))
    assert resolve_backbone_source(KBConfig(backbone="Qwen/Qwen2.5-3B-Instruct")) == "Qwen/Qwen2.5-3B-Instruct"


def test_pad_token_equal_to_end_of_turn_is_replaced():
    tok = tiny_chat_tokenizer(pad=False)
    tok.pad_token = "<|im_end|>"
    ensure_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>"
    tok.pad_token = "<|im_start|>"  # a pad that is not the end of turn is kept
    ensure_pad_token(tok)
    assert tok.pad_token == "<|im_start|>"


def test_build_prompt_is_chatml_with_the_shared_instruction():
    tok = tiny_chat_tokenizer()
    got = build_prompt(tok, "  Who runs BrightSky Robotics? ")
    assert got == (f"<|im_start|>system\n{SHORT_ANSWER_INSTRUCTION}<|im_end|>\n"
                   "<|im_start|>user\nWho runs BrightSky Robotics?<|im_end|>\n<|im_start|>assistant\n")
    fact = fact_from_dict({"head": {"id": "E1", "name": "BrightSky Robotics", "type": "ORG"},
                           "relation": {"id": "R1", "name": "chief executive officer"},
                           "tail": {"id": "E2", "name": "Alice Zhang", "type": "PERSON"},
                           "context": {"sent_span": "Alice Zhang became the CEO."},
                           "time_window": {"start": "2019-03-02", "end": None}})
    rag = build_prompt(tok, "Who runs it?", instruction="Be short.", context_facts=[fact, "Sky is blue."])
    assert rag == ("<|im_start|>system\nBe short.<|im_end|>\n<|im_start|>user\nFacts that may help:\n"
                   "- BrightSky Robotics | chief executive officer | Alice Zhang (from 2019-03-02 to now)\n"
                   "- Sky is blue.\n\nQuestion: Who runs it?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="build_prompt: empty question"):
        build_prompt(tok, "  ")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        build_prompt(tok, "Who?")


def test_embedded_locations_and_cache_validity(tmp_path, monkeypatch):
    folder = Path(embedded.resolve_embedding_model("embedded:all-MiniLM-L6-v2"))
    assert (folder / "modules.json").is_file()
    assert embedded.resolve_embedding_model("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "c"))
    assert embedded.cache_root("~/ignored") == tmp_path / "c"
    monkeypatch.delenv(embedded.CACHE_ENV)
    assert embedded.cache_root(str(tmp_path / "d")) == tmp_path / "d"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"12345")
    out = tmp_path / "conv"
    out.mkdir()
    assert not embedded._cache_is_valid(out, gguf)  # an unfinished folder (no marker) is not used
    marker = {"gguf_name": "m.gguf", "gguf_size": 5}
    (out / embedded.SOURCE_FILE).write_text(json.dumps(marker))
    assert embedded._cache_is_valid(out, gguf)
    gguf.write_bytes(b"123456")  # the package shipped a different file: convert again
    assert not embedded._cache_is_valid(out, gguf)


def test_failed_conversion_leaves_no_cache_folder(tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file at all")
    out = tmp_path / "cache" / "embedded" / "broken"
    with pytest.raises(Exception):
        embedded.convert_gguf(gguf, out)
    assert not out.exists()
    assert not any(p.name.startswith(".broken.tmp-") for p in out.parent.glob("*")) if out.parent.exists() else True
