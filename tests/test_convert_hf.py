"""HuggingFace <-> Meta conversion: exact round trip, and the same logits as transformers."""

import json
import shutil
import sys

import pytest
import torch

from conftest import TINY, run_checked
from llama import Llama, convert_hf
from llama.model import ffn_hidden_dim

PROMPT = torch.tensor([[1, 306, 58, 278, 450, 74, 310, 34, 338, 12]])


def our_logits(meta_dir) -> torch.Tensor:
    generator = Llama.build(str(meta_dir), str(meta_dir / "tokenizer.model"), max_seq_len=32, max_batch_size=1)
    with torch.inference_mode():
        return generator.model.forward(PROMPT, 0)


def hf_logits(hf_dir) -> torch.Tensor:
    transformers = pytest.importorskip("transformers", reason="pip install -e .[test] for transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        return model(PROMPT).logits


def test_meta_to_hf_to_meta_is_bit_identical(tmp_path, tiny_ckpt_mp2):
    convert_hf.meta_to_hf(tiny_ckpt_mp2, tmp_path / "hf")
    assert convert_hf.main(["to-meta", str(tmp_path / "hf"), str(tmp_path / "back"), "--mp", "2"]) == 0
    for name in ("params.json", "tokenizer.model"):
        assert (tmp_path / "back" / name).read_bytes() == (tiny_ckpt_mp2 / name).read_bytes()
    for rank in range(2):
        original = torch.load(tiny_ckpt_mp2 / f"consolidated.{rank:02d}.pth", weights_only=True)
        back = torch.load(tmp_path / "back" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert back.keys() == original.keys()
        for key in original:
            assert back[key].dtype == original[key].dtype and torch.equal(back[key], original[key]), key


def test_hf_rows_are_permuted_per_head():
    # Meta pairs (x0, x1), (x2, x3) of a head of size 4 become halves (x0, x2), (x1, x3).
    meta = torch.arange(8.0).reshape(8, 1)  # two heads of size 4
    hf = convert_hf.permute_to_hf(meta, n_heads=2)
    assert hf.flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(convert_hf.permute_to_meta(hf, n_heads=2), meta)


def test_converted_to_hf_gives_our_logits(tmp_path, tiny_ckpt):
    convert_hf.meta_to_hf(tiny_ckpt, tmp_path / "hf")
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), our_logits(tiny_ckpt), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_model_converted_to_meta_gives_its_logits(tmp_path, tiny_tokenizer, tied):
    # A model made by transformers itself: grouped-query attention, a rope
    # theta and a hidden size Llama 2 never used, saved in several
    # safetensors files with an index.
    transformers = pytest.importorskip("transformers", reason="pip install -e .[test] for transformers")
    config = transformers.LlamaConfig(
        vocab_size=TINY["vocab_size"], hidden_size=64, intermediate_size=200, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    shutil.copyfile(tiny_tokenizer, tmp_path / "hf" / "tokenizer.model")

    convert_hf.hf_to_meta(tmp_path / "hf", tmp_path / "meta", model_parallel_size=2)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["rope_theta"] == 500000.0 and params["n_kv_heads"] == 2
    assert ffn_hidden_dim(64, params["multiple_of"], params.get("ffn_dim_multiplier")) == 200
    torch.testing.assert_close(our_logits(tmp_path / "meta"), hf_logits(tmp_path / "hf"), atol=1e-5, rtol=0)


LLAMA2_7B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "vocab_size": 32000,
}


def test_params_of_meta_models_come_back_as_meta_wrote_them():
    args = convert_hf.model_args_from_hf_config(LLAMA2_7B)
    assert (args.multiple_of, args.ffn_dim_multiplier, args.n_kv_heads) == (256, None, None)
    llama2_70b = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                  "num_key_value_heads": 8, "num_hidden_layers": 80}
    args = convert_hf.model_args_from_hf_config(llama2_70b)
    assert (args.multiple_of, args.ffn_dim_multiplier, args.n_kv_heads) == (4096, 1.3, 8)
    # Any other size still comes out exactly.
    for dim, hidden in ((64, 200), (96, 257), (4096, 14336)):
        multiple_of, multiplier = convert_hf.ffn_params_for(dim, hidden)
        assert ffn_hidden_dim(dim, multiple_of, multiplier) == hidden


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_bias": True}, "attention_bias is set"),
        ({"mlp_bias": True}, "mlp_bias is set"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling of type 'linear'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "low_freq_factor": 2.0}}, "low_freq_factor 2.0"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling of type .yarn."),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"head_dim": 64}, "head_dim 64 is not"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
    ],
)
def test_configs_this_model_cannot_express_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        convert_hf.model_args_from_hf_config({**LLAMA2_7B, **change})


def test_cli(tmp_path, tiny_ckpt, capsys):
    proc = run_checked([sys.executable, "-m", "llama.convert_hf", "to-hf", str(tiny_ckpt), str(tmp_path / "hf")])
    assert "wrote" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    # A non-empty destination is a command-line error (tests/test_tool_command_lines.py).
    with pytest.raises(SystemExit) as exit:
        convert_hf.main(["to-hf", str(tiny_ckpt), str(tmp_path / "hf")])
    assert exit.value.code == 2
    assert "not an empty directory" in capsys.readouterr().err
    # A config this model cannot express is refused before anything is written.
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**LLAMA2_7B, "attention_bias": True}))
    assert convert_hf.main(["to-meta", str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    assert "cannot be expressed in Meta's format: attention_bias is set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_match_config_are_refused(tmp_path, tiny_ckpt):
    convert_hf.meta_to_hf(tiny_ckpt, tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "intermediate_size": 256, "multiple_of": 256}))
    with pytest.raises(ValueError, match=r"mlp.down_proj.weight has shape \(64, 192\); config.json implies \(64, 256\)"):
        convert_hf.hf_to_meta(tmp_path / "hf", tmp_path / "meta")
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"num_hidden_layers is 3 in the config, but .* holds layers 0 to 1"):
        convert_hf.hf_to_meta(tmp_path / "hf", tmp_path / "meta")
    assert not (tmp_path / "meta").exists()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_to_hf_of_a_quantized_checkpoint_says_it_is_quantized(tmp_path, tiny_ckpt, mode, capsys):
    from llama import quantize

    assert quantize.main([str(tiny_ckpt), str(tmp_path / "q"), "--quantize", mode]) == 0
    with pytest.raises(ValueError) as error:
        convert_hf.meta_to_hf(tmp_path / "q", tmp_path / "hf")
    message = str(error.value)
    assert f"is quantized ({mode}" in message and "unexpected" not in message
    assert "unquantized checkpoint" in message and f"--quantize {mode}" in message
    capsys.readouterr()
    assert convert_hf.main(["to-hf", str(tmp_path / "q"), str(tmp_path / "hf")]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "hf").exists()


def test_to_meta_of_a_meta_checkpoint_says_it_is_in_meta_format(tmp_path, tiny_ckpt, capsys):
    with pytest.raises(FileNotFoundError, match=r"already in Meta's format .*`to-hf` converts the other way"):
        convert_hf.hf_to_meta(tiny_ckpt, tmp_path / "meta")
    assert convert_hf.main(["to-meta", str(tiny_ckpt), str(tmp_path / "meta")]) == 1
    assert "already in Meta's format" in capsys.readouterr().err
    assert not (tmp_path / "meta").exists()


@pytest.fixture(scope="module")
def llama31_ckpt(tmp_path_factory):
    """A tiny Llama 3.1-shaped checkpoint (`python -m llama.tiny OUT --family llama3`)."""
    from llama.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama31"), family_name="llama3")


def load_hf_config_and_model(hf_dir):
    """transformers' config and model of `hf_dir`, and the warnings it logged or raised while loading."""
    import logging
    import warnings

    transformers = pytest.importorskip("transformers", reason="pip install -e .[test] for transformers")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers")  # transformers' loggers do not reach the root logger
    handler = Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = transformers.AutoConfig.from_pretrained(str(hf_dir))
            model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    finally:
        logger.removeHandler(handler)
    return config, model, records + [str(w.message) for w in caught]


def test_llama31_to_hf_states_a_context_transformers_accepts(tmp_path, llama31_ckpt):
    convert_hf.meta_to_hf(llama31_ckpt, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    original = written["rope_scaling"]["original_max_position_embeddings"]
    # What Meta's HuggingFace repositories of Llama 3.1 and later state.
    assert (written["max_position_embeddings"], original) == (131072, 8192)
    config, _, logged = load_hf_config_and_model(tmp_path / "hf")
    assert config.max_position_embeddings >= original
    assert not [line for line in logged if "max_position_embeddings" in line], logged


def test_a_given_max_position_embeddings_is_kept_unless_below_the_original_context(tmp_path, llama31_ckpt,
                                                                                   tiny_ckpt, capsys):
    convert_hf.meta_to_hf(llama31_ckpt, tmp_path / "hf", max_position_embeddings=16384)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 16384
    assert convert_hf.main(["to-hf", str(llama31_ckpt), str(tmp_path / "short"),
                            "--max-position-embeddings", "4096"]) == 1
    assert "max_position_embeddings 4096 must be above the original context" in capsys.readouterr().err
    assert not (tmp_path / "short").exists()
    # Plain rotary embeddings (Llama 2): no original context; Llama 2's 4096 unless given.
    convert_hf.meta_to_hf(tiny_ckpt, tmp_path / "llama2")
    assert json.loads((tmp_path / "llama2" / "config.json").read_text())["max_position_embeddings"] == 4096
    convert_hf.meta_to_hf(tiny_ckpt, tmp_path / "llama2-short", max_position_embeddings=512)
    assert json.loads((tmp_path / "llama2-short" / "config.json").read_text())["max_position_embeddings"] == 512
