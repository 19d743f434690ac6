import json
import shutil

import pytest
import torch

from llama import Llama
from llama.tiny import make_tiny_checkpoint


def build(ckpt, **kwargs):
    args = dict(ckpt_dir=str(ckpt), tokenizer_path=str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=2)
    args.update(kwargs)
    return Llama.build(**args)


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint, free to break."""
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def test_build_twice_in_one_process_gives_the_same_tokens(tiny_ckpt):
    first = build(tiny_ckpt).generate([[1, 5, 9]], max_gen_len=5, temperature=0)
    second = build(tiny_ckpt).generate([[1, 5, 9]], max_gen_len=5, temperature=0)
    assert first == second


def test_build_leaves_the_callers_torch_defaults_alone(tiny_ckpt):
    dtype = torch.get_default_dtype()
    probe = torch.empty(1)
    build(tiny_ckpt, dtype=torch.bfloat16)
    assert torch.get_default_dtype() == dtype
    assert torch.empty(1).device == probe.device


def test_build_seeds_sampling(tiny_ckpt):
    runs = []
    for _ in range(2):
        generator = build(tiny_ckpt, seed=7)
        runs.append(generator.generate([[1, 5, 9]], max_gen_len=8, temperature=1.0)[0])
    assert runs[0] == runs[1]


def test_bf16_checkpoint_with_rope_freqs_loads_like_meta_downloads(tmp_path, tiny_tokenizer, tiny_ckpt):
    ckpt = make_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16, tokenizer=tiny_tokenizer,
                                dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, seed=0)
    shard = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    assert shard["output.weight"].dtype == torch.bfloat16
    shard["rope.freqs"] = torch.zeros(8)  # older Meta checkpoints carry this
    torch.save(shard, ckpt / "consolidated.00.pth")

    generator = build(ckpt)  # CPU default: fp32, converted tensor by tensor
    assert generator.model.output.weight.dtype == torch.float32
    # The bf16 weights are the fp32 ones rounded: logits stay close.
    reference = build(tiny_ckpt)
    tokens = torch.tensor([[1, 45, 300, 12]])
    with torch.inference_mode():
        close = generator.model.forward(tokens, 0) - reference.model.forward(tokens, 0)
    assert close.abs().max() < 0.5

    in_bf16 = build(ckpt, dtype=torch.bfloat16)
    assert in_bf16.model.layers[0].attention.cache_k.dtype == torch.bfloat16
    assert len(in_bf16.generate([[1, 5]], max_gen_len=3, temperature=0)[0][0]) == 3


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        Llama.build(str(tmp_path / "nope"), str(tmp_path / "tok.model"), 64, 1)


def test_directory_without_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint files \(\*\.pth\)"):
        Llama.build(str(tmp_path), str(tmp_path / "tok.model"), 64, 1)


def test_missing_params(ckpt_copy):
    (ckpt_copy / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json not found"):
        build(ckpt_copy)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"dim": 64, "n_layers": 2, "n_heads": 4, "hidden": 3}', "unknown field 'hidden'"),
        ('{"dim": "64", "n_layers": 2, "n_heads": 4}', "field 'dim' has the wrong type"),
        ('{"dim": 64, "n_layers": 2, "n_heads": 5}', "not a multiple of n_heads"),
    ],
)
def test_invalid_params(ckpt_copy, text, message):
    (ckpt_copy / "params.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        build(ckpt_copy)


def test_missing_tokenizer(ckpt_copy):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        build(ckpt_copy, tokenizer_path=str(ckpt_copy / "missing.model"))


def test_tokenizer_that_is_not_sentencepiece(ckpt_copy):
    (ckpt_copy / "bad.model").write_text("hello")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build(ckpt_copy, tokenizer_path=str(ckpt_copy / "bad.model"))


def test_vocabulary_that_disagrees_with_the_checkpoint(ckpt_copy, tmp_path):
    from llama.tiny import train_tokenizer

    train_tokenizer(tmp_path / "small.model", vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size 512 but the tokenizer .* has 400 pieces"):
        build(ckpt_copy, tokenizer_path=str(tmp_path / "small.model"))
    params = json.loads((ckpt_copy / "params.json").read_text())
    params["vocab_size"] = -1  # as in Meta's params.json: the checkpoint's rows decide
    (ckpt_copy / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has shape \(512, 64\).* \(400, 64\).*wrong tokenizer"):
        build(ckpt_copy, tokenizer_path=str(tmp_path / "small.model"))


def test_shards_that_do_not_fit_their_count_are_named(ckpt_copy):
    # Two copies of a one-shard file are not a two-shard checkpoint.
    shutil.copy(ckpt_copy / "consolidated.00.pth", ckpt_copy / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has shape \(512, 64\) .* shard 0 of 2 .* \(512, 32\)$"):
        build(ckpt_copy)


def test_missing_weight_is_named(ckpt_copy):
    shard = torch.load(ckpt_copy / "consolidated.00.pth", weights_only=True)
    del shard["layers.1.feed_forward.w3.weight"]
    torch.save(shard, ckpt_copy / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"missing layers\.1\.feed_forward\.w3\.weight \(full shape \(192, 64\)\)"):
        build(ckpt_copy)


def test_unexpected_weight_is_named(ckpt_copy):
    shard = torch.load(ckpt_copy / "consolidated.00.pth", weights_only=True)
    shard["extra.weight"] = torch.zeros(2)
    torch.save(shard, ckpt_copy / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"unexpected extra\.weight \(shape \(2,\)\)"):
        build(ckpt_copy)


def test_misshaped_weight_names_both_shapes(ckpt_copy):
    shard = torch.load(ckpt_copy / "consolidated.00.pth", weights_only=True)
    shard["layers.0.attention.wk.weight"] = torch.zeros(16, 64)
    torch.save(shard, ckpt_copy / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"layers.0.attention.wk.weight has shape \(16, 64\) .* has \(32, 64\)$"):
        build(ckpt_copy)


def test_corrupt_shard_is_named(ckpt_copy):
    (ckpt_copy / "consolidated.00.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint shard .*consolidated.00.pth"):
        build(ckpt_copy)


def test_pickled_code_is_refused(ckpt_copy):
    class Sneaky:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    torch.save({"x": Sneaky()}, ckpt_copy / "consolidated.00.pth")
    with pytest.raises(ValueError, match="cannot read checkpoint shard"):
        build(ckpt_copy)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_seq_len=0), "max_seq_len must be a positive int"),
        (dict(max_batch_size=1.5), "max_batch_size must be a positive int"),
        (dict(dtype=torch.int64), "floating point"),
        (dict(dtype="float8"), "unknown dtype"),
    ],
)
def test_bad_build_arguments(tiny_ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_ckpt, **kwargs)


def test_cuda_graph_needs_cuda_and_excludes_compile(tiny_ckpt):
    from llama.decode_step import check_options

    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device; the model is on cpu"):
        build(tiny_ckpt, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="pass compile=True or cuda_graph=True, not both"):
        check_options(torch.device("cuda", 0), compile=True, cuda_graph=True)
    check_options(torch.device("cuda", 0), compile=False, cuda_graph=True)  # the one way it is allowed
