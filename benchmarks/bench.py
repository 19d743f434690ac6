"""Decoding speed of this library, side by side with `transformers`, on random weights.

    python benchmarks/bench.py                        # ~15M and ~100M shapes, fp32, CPU
    python benchmarks/bench.py --llama2c /path/to/llama2.c/run   # with llama2.c's run.c beside us
    python benchmarks/bench.py --shapes 100M --compile --plot bench.png
    python benchmarks/bench.py --shapes 7B --device cuda --dtype float16 --compile --cuda-graph

For each named shape it makes one random Meta-format state dict (Meta's keys,
seeded), loads it into our `Transformer` through the library's strict loader,
and, when `transformers` is installed (`pip install -e .[bench]`), into a
`LlamaForCausalLM` after the usual q/k row permutation, so both run the same
numbers. The two then run alternately, after warm-up, on the same random
prompts; every figure is a median over `--runs` runs:

- decode tokens/s at each batch size (generated tokens after the first, over
  the time they took; greedy, no early stop unless EOS is drawn),
- time to first token and prefill tokens/s (the prompt plus one sampled token),
- memory: the model's own tensors plus the peak growth during one generation
  (CUDA: allocator peak; CPU: resident set size, sampled),
- our/their ratio for each.

It also measures the machine's read bandwidth (a `torch.sum` over a large
array) and prints, for batch 1, the ceiling bandwidth / bytes of weights read
per token and each library's fraction of it. Results go to a JSON file and a
table; `--plot` draws decode tokens/s against batch size.

The first "llama" row is what `Llama.build` gives by default on the device
and dtype (the layout `llama.kernels.choose_layout` picks); the rows of
opt-in variants are named by the option (`llama compile=True`, ...).

With `--llama2c BINARY` (a `run` built from Andrej Karpathy's llama2.c, e.g.
`make runomp`; nothing of it is part of this repository), the same weights
are also written in llama2.c's fp32 checkpoint format and the binary decodes
them, fp32 on the CPU at batch 1, with OMP_NUM_THREADS set to our thread
count, alternating with the other rows. Its figure is the rate it reports
itself ("achieved tok/s": every position after the first, prompt positions
included, one token at a time).

With `--llamacpp SRC` (SRC: a llama.cpp source tree, e.g. the `vendor/llama.cpp`
folder of llama-cpp-python's source package; needs `llama_cpp` and `gguf`
installed, see benchmarks/README.md; neither is a dependency of this project),
the same fp32 weights are written as a Meta checkpoint, converted by our
`python -m llama.convert_hf to-hf` and then by SRC's `convert_hf_to_gguf.py`
to an F32 GGUF, which llama.cpp's own quantizer (`llama_model_quantize`) turns
into Q8_0 and Q4_0. Each runs in this process through llama-cpp-python at
batch 1 on our thread count, in turn with our rows: the prompt in one
`eval`, then one token at a time, greedy, timed as ours are. Each llama.cpp
row is compared with ours of the same width (F32 with our first fp32 row,
Q8_0 with int8, Q4_0 with int4), run by run.
"""

import argparse
import importlib
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama import Llama, Tokenizer, checkpoint, distributed, kernels, quantization  # noqa: E402
from llama.model import ModelArgs, Transformer, ffn_hidden_dim, precompute_freqs_cis  # noqa: E402
from llama.tiny import random_weights, train_tokenizer  # noqa: E402

SHAPES = {
    # llama2.c's stories15M
    "15M": dict(dim=288, n_layers=6, n_heads=6, multiple_of=32, vocab_size=32000),
    # the ~100M shape of PERF-FACTS.md: ~438 MB of fp32 weights read per token
    "100M": dict(dim=768, n_layers=12, n_heads=12, multiple_of=256, vocab_size=32000),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, vocab_size=32000),
}

LLAMA2_TOKENIZER = Path(os.environ.get("LLAMA2_TOKENIZER") or REPO.parent / "shared" / "data" / "llama2-tokenizer.model")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, runs: int) -> float:
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(device: torch.device, gib: float = 1.0, runs: int = 15) -> float:
    """Bytes/s of the faster of two plain streaming reads of `gib` GiB of fp32:
    `torch.sum`, and a vector times the same bytes as a matrix (each byte read
    once). On the 2-core CPU `torch.sum` alone reads slower (~22 GB/s) than
    the matrix product (~25 GB/s), so it alone would set the ceiling too low."""
    data = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    matrix = data.view(-1, 4096)
    vector = torch.ones(matrix.shape[0], dtype=torch.float32, device=device)
    rates = []
    for read in (lambda: data.sum(), lambda: vector @ matrix):
        read()
        rates.append(data.numel() * 4 / median_time(read, device, runs))
    return max(rates)


def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Weight bytes one batch-1 decode step must read: every matrix and norm, one embedding row."""
    n_kv_heads = args.n_kv_heads or args.n_heads
    head_dim = args.dim // args.n_heads
    from llama.model import ffn_hidden_dim

    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    attention = args.dim * head_dim * (2 * args.n_heads + 2 * n_kv_heads)
    feed_forward = 3 * args.dim * hidden
    per_layer = attention + feed_forward + 2 * args.dim
    total = args.n_layers * per_layer + args.dim + args.vocab_size * args.dim + args.dim
    return total * torch.finfo(dtype).bits // 8


class RssPeak:
    """Peak resident set size of this process while the `with` block runs (sampled)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a batch-1 decode step reads from `model`'s weights as they are held
    (quantized, packed, fused or not): every matrix and norm, one embedding row.
    Overlapping tensors (views into a fused matrix) count once."""
    spans = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or t.device.type == "meta" or name.split(".")[-1] in ("cache_k", "cache_v", "rope"):
            continue
        if name == "tok_embeddings.weight":
            continue
        try:
            start = t.data_ptr()
        except (NotImplementedError, RuntimeError):  # oneDNN's packed weights: a tensor of their own
            start = -id(t) * 2**40
        spans.append((start, start + t.numel() * t.element_size()))
    total, reach = 0, float("-inf")
    for start, end in sorted(spans):
        start = max(start, reach)
        if end > start:
            total += end - start
            reach = end
    embedding = model.tok_embeddings.weight
    return total + embedding.shape[1] * embedding.element_size()


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    seen = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if t is not None and t.device.type != "meta":
            try:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            except NotImplementedError:  # oneDNN's packed weights have no storage to look at
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


class Runner:
    """One library on one model: runs a greedy generation and reports per-step times."""

    name: str

    def steps(self, prompts: torch.Tensor, gen_len: int) -> List[float]:
        """Time from the call to each generated token's arrival, in seconds."""
        raise NotImplementedError

    def memory(self, prompts: torch.Tensor, gen_len: int, device: torch.device) -> int:
        """Model tensors plus peak growth over one generation, in bytes."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.steps(prompts, gen_len)
            growth = torch.cuda.max_memory_allocated(device) - before
        else:
            with RssPeak() as rss:
                self.steps(prompts, gen_len)
            growth = rss.peak - rss.start
        return self.model_bytes + max(growth, 0)


class OurRunner(Runner):
    """Ours on weights in memory (`state`), or, with `ckpt_dir`, built from that checkpoint."""

    def __init__(self, name, state, args, tokenizer, device, dtype, quantize_mode=None, group_size=None,
                 ckpt_dir=None, **build_options):
        distributed.init_distributed(device, 1)
        if ckpt_dir is not None:
            self.generator = Llama.build(
                str(ckpt_dir), str(tokenizer), max_seq_len=args.max_seq_len,
                max_batch_size=args.max_batch_size, device=str(device), dtype=dtype,
                quantize=quantize_mode, group_size=group_size, **build_options,
            )
        else:
            model = model_from_state(state, args, device, dtype, quantize_mode, group_size)
            if quantize_mode is not None:
                build_options["fast_layout"] = False  # the quantized kernels are the layout
            layout = build_options.pop("layout", None)
            if layout is not None:  # a layout other than the default's, laid out here
                kernels.prepare(model, layout)
                build_options["fast_layout"] = False
            self.generator = Llama.from_model(model, tokenizer, **build_options)
        self.model_bytes = tensor_bytes(self.generator.model)
        self.bytes_per_token = weight_bytes_per_token(self.generator.model)
        self.device = device
        self.name = name
        self.group = str(dtype) if quantize_mode is None else quantize_mode

    def steps(self, prompts, gen_len):
        g = self.generator
        times = []
        start = time.perf_counter()
        # generate()'s own loop, under the inference mode generate() runs in
        with torch.inference_mode():
            state = g._start_decoding(prompts.tolist(), gen_len, temperature=0.0, top_p=1.0, logprobs=False)
            for step in g._decode_steps(state):
                if step == state.min_prompt_len:  # the first token: waited for, to time the prefill
                    synchronize(self.device)
                times.append(time.perf_counter() - start)
        # The steps between are not waited for (that would stall a GPU that
        # runs ahead); the last one's time is when the GPU finished it.
        synchronize(self.device)
        times[-1] = time.perf_counter() - start
        return times


def model_from_state(state: Dict[str, torch.Tensor], args: ModelArgs, device, dtype: torch.dtype,
                     quantize_mode: Optional[str] = None, group_size: Optional[int] = None) -> Transformer:
    """A Transformer of `args` holding `state` (Meta's keys, one shard) in `dtype` on `device`,
    quantized while loading as `Llama.build(quantize=...)` does where `quantize_mode` is given (its
    kernels are then its layout); `state` itself is left as it was."""
    with checkpoint.init_on_meta():
        model = Transformer(args)
    config = quantization.make_config(quantize_mode, group_size)
    if config is None:
        checkpoint.load_into(model, state, device, dtype, source="random weights")
        return model
    quantization.check_fit(args, config, [1])
    convert = quantization.converter(config, dtype, 1)
    parts = {}
    for key in list(state):
        parts.update(convert(key, state[key], None))
    quantization.install(model, parts, config, device, dtype)
    return model


class TheirRunner(Runner):
    """`transformers.LlamaForCausalLM` on the same weights (their half-split rotary layout)."""

    def __init__(self, state, args: ModelArgs, device, dtype):
        import transformers

        n_kv_heads = args.n_kv_heads or args.n_heads
        head_dim = args.dim // args.n_heads
        from llama.model import ffn_hidden_dim

        config = transformers.LlamaConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.dim,
            intermediate_size=ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
            num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads,
            num_key_value_heads=n_kv_heads,
            max_position_embeddings=args.max_seq_len,
            rms_norm_eps=args.norm_eps,
            tie_word_embeddings=False,
        )
        # transformers 5 reads rope_parameters, 4.x reads rope_theta
        config.rope_theta = args.rope_theta
        if getattr(config, "rope_parameters", None) is not None:
            config.rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta}
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = transformers.LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)

        def pairs_to_halves(w, n_heads):
            # Meta rotates adjacent pairs (x[2i], x[2i+1]); HF rotates (x[i], x[i + head_dim/2]).
            return w.view(n_heads, head_dim // 2, 2, args.dim).transpose(1, 2).reshape(n_heads * head_dim, args.dim)

        hf = {
            "model.embed_tokens.weight": state["tok_embeddings.weight"],
            "model.norm.weight": state["norm.weight"],
            "lm_head.weight": state["output.weight"],
        }
        for i in range(args.n_layers):
            meta, ours = f"layers.{i}.", f"model.layers.{i}."
            hf[ours + "self_attn.q_proj.weight"] = pairs_to_halves(state[meta + "attention.wq.weight"], args.n_heads)
            hf[ours + "self_attn.k_proj.weight"] = pairs_to_halves(state[meta + "attention.wk.weight"], n_kv_heads)
            hf[ours + "self_attn.v_proj.weight"] = state[meta + "attention.wv.weight"]
            hf[ours + "self_attn.o_proj.weight"] = state[meta + "attention.wo.weight"]
            hf[ours + "mlp.gate_proj.weight"] = state[meta + "feed_forward.w1.weight"]
            hf[ours + "mlp.up_proj.weight"] = state[meta + "feed_forward.w3.weight"]
            hf[ours + "mlp.down_proj.weight"] = state[meta + "feed_forward.w2.weight"]
            hf[ours + "input_layernorm.weight"] = state[meta + "attention_norm.weight"]
            hf[ours + "post_attention_layernorm.weight"] = state[meta + "ffn_norm.weight"]
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in hf.items()}, strict=True)
        model.eval()
        model.generation_config.pad_token_id = 0
        self.model = model
        self.model_bytes = tensor_bytes(model)
        self.bytes_per_token = bytes_per_token(args, dtype)
        self.device = device
        self.group = str(dtype)
        self.name = f"transformers {transformers.__version__} {str(dtype).removeprefix('torch.')}"

    def steps(self, prompts, gen_len):
        import transformers

        times = []
        start = time.perf_counter()
        device = self.device

        class Clock(transformers.LogitsProcessor):
            # Called once per step, right after the step's forward pass; as
            # for ours, only the first and the last step are waited for.
            def __call__(self, input_ids, scores):
                if not times:
                    synchronize(device)
                times.append(time.perf_counter() - start)
                return scores

        with torch.inference_mode():
            self.model.generate(
                prompts.to(self.device),
                attention_mask=torch.ones_like(prompts, device=self.device),
                max_new_tokens=gen_len,
                do_sample=False,
                logits_processor=transformers.LogitsProcessorList([Clock()]),
            )
        synchronize(device)
        times[-1] = time.perf_counter() - start
        return times


def summarize(step_times: List[List[float]], batch: int, prompt_len: int) -> Dict:
    decode = [batch * (len(t) - 1) / (t[-1] - t[0]) for t in step_times if len(t) > 1]
    ttft = [t[0] for t in step_times]
    return {
        "decode_tokens_per_s": statistics.median(decode) if decode else None,
        "ttft_ms": 1e3 * statistics.median(ttft),
        "prefill_tokens_per_s": batch * prompt_len / statistics.median(ttft),
        "decode_runs": decode,
        "prefill_runs": [batch * prompt_len / t for t in ttft],
    }


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def write_llama2c_checkpoint(path, state: Dict[str, torch.Tensor], args: ModelArgs) -> None:
    """`state` (Meta's keys, MP 1) in llama2.c's original fp32 format: a header of
    seven int32 (dim, hidden, layers, heads, kv heads, -vocab for a separate
    output matrix, max_seq_len), then fp32 arrays, each kind for all layers in
    turn, in Meta's [out, in] layout and rotary pair order."""
    n_kv_heads = args.n_kv_heads or args.n_heads
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    freqs = torch.view_as_real(precompute_freqs_cis(args.dim // args.n_heads, args.max_seq_len, args.rope_theta))
    layer_keys = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    arrays = [state["tok_embeddings.weight"]]
    arrays += [state[f"layers.{i}.{key}.weight"] for key in layer_keys for i in range(args.n_layers)]
    arrays += [state["norm.weight"], freqs[..., 0], freqs[..., 1], state["output.weight"]]
    with open(path, "wb") as f:
        f.write(struct.pack("7i", args.dim, hidden, args.n_layers, args.n_heads, n_kv_heads,
                            -args.vocab_size, args.max_seq_len))
        for a in arrays:
            f.write(a.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


class Llama2cRunner:
    """llama2.c's `run` binary on the same weights, greedy, batch 1 (see the module docstring)."""

    PROMPT = "Once upon a time, in a quiet village by the sea, there lived an old fisherman"

    def __init__(self, binary: str, tokenizer: str, state, args: ModelArgs, folder: str, threads: int):
        self.path = str(Path(folder) / "llama2c.bin")
        write_llama2c_checkpoint(self.path, state, args)
        self.binary, self.tokenizer, self.args = binary, tokenizer, args
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.name = "llama2.c run.c"
        self.model_bytes = None

    def rate(self, steps: int) -> float:
        """The tokens/s the binary reports for a run of `steps` positions."""
        done = subprocess.run(
            [self.binary, self.path, "-z", self.tokenizer, "-t", "0", "-n", str(steps), "-i", self.PROMPT],
            capture_output=True, text=True, env=self.env, timeout=600,
        )
        for line in done.stderr.splitlines():
            if line.startswith("achieved tok/s:"):
                return float(line.split(":")[1])
        raise RuntimeError(f"{self.binary} reported no tokens/s (exit {done.returncode}): {done.stderr[-500:]}")


LLAMACPP_TYPES = {"F32": None, "Q8_0": "int8", "Q4_0": "int4"}  # GGUF type -> our mode of the same width


def write_llamacpp_models(src: Path, state: Dict[str, torch.Tensor], args: ModelArgs, tokenizer_path: Path,
                          folder: Path, threads: int) -> Dict[str, Path]:
    """`state` as GGUF files, F32 (through our to-hf and llama.cpp's converter) and Q8_0 and Q4_0
    (quantized by llama.cpp's own quantizer): {type: path}."""
    meta, hf = folder / "meta", folder / "hf"
    meta.mkdir()
    torch.save({k: v.to(torch.float32) for k, v in state.items()}, meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(checkpoint.params_dict(args)) + "\n")
    (meta / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    subprocess.run([sys.executable, "-m", "llama.convert_hf", "to-hf", str(meta), str(hf)], check=True, cwd=REPO)
    paths = {"F32": folder / "model-F32.gguf"}
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                    "--outfile", str(paths["F32"])], check=True, capture_output=True)
    for name in ("Q8_0", "Q4_0"):
        paths[name] = folder / f"model-{name}.gguf"
        # In a process of its own: the quantizer prints a line a tensor on stderr.
        done = subprocess.run([sys.executable, "-c", LLAMACPP_QUANTIZE, str(paths["F32"]), str(paths[name]), name,
                               str(threads)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp's quantizer failed to write {name}: {done.stderr[-500:]}")
    return paths


LLAMACPP_QUANTIZE = """
import sys, llama_cpp
source, destination, name, threads = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + name)
params.nthread = int(threads)
sys.exit(llama_cpp.llama_model_quantize(source.encode(), destination.encode(), params))
"""


class LlamaCppRunner(Runner):
    """llama.cpp (llama-cpp-python) on a GGUF of the same weights, batch 1, greedy, in this process."""

    max_batch = 1

    def __init__(self, kind: str, path: Path, args: ModelArgs, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=args.max_seq_len, n_batch=args.max_seq_len,
                                   n_ubatch=args.max_seq_len, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        self.name = f"llama.cpp {kind}"
        self.kind = kind
        self.mode = LLAMACPP_TYPES[kind]
        self.group = str(torch.float32) if kind == "F32" else kind  # F32 joins the check of greedy tokens
        self.model_bytes = self.bytes_per_token = path.stat().st_size
        self.eos = self.llm.token_eos()
        self.vocab = self.llm.n_vocab()

    def _next(self) -> int:
        """The argmax of the last position's logits (llama-cpp-python keeps no logits of its own
        unless asked for every position's)."""
        import numpy
        import llama_cpp

        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(numpy.ctypeslib.as_array(logits, shape=(self.vocab,)).argmax())

    def steps(self, prompts, gen_len):
        if prompts.shape[0] != 1:
            raise ValueError("llama.cpp's rows run at batch 1 only")
        llm, times = self.llm, []
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompts[0].tolist())
        token = self._next()
        times.append(time.perf_counter() - start)
        for _ in range(gen_len - 1):  # as ours: no early stop (EOS is one token among 32000)
            llm.eval([token])
            token = self._next()
            times.append(time.perf_counter() - start)
        return times

    def greedy(self, prompt: List[int], gen_len: int) -> List[int]:
        """The greedy continuation, up to EOS (for the check that the conversion kept the numbers)."""
        llm, out = self.llm, []
        llm.reset()
        llm.eval(prompt)
        for _ in range(gen_len):
            token = self._next()
            if token == self.eos:
                break
            out.append(token)
            llm.eval([token])
        return out


def our_variants(opts) -> List:
    """(name, dtype, options) of each of our runs: every --dtype, then every --quantize.
    The first is the baseline that the others are compared with."""
    variants = []
    for dtype in opts.dtypes:
        suffix = "" if len(opts.dtypes) == 1 and not opts.quantize else f" {dtype_name(dtype)}"
        # The first row of a dtype is build's default for it; opt-in variants are named by their option.
        if opts.eager or not (opts.compile or opts.cuda_graph):
            variants.append((f"llama{suffix}", dtype, {}))
        if opts.no_fast_layout:
            variants.append((f"llama fast_layout=False{suffix}", dtype, {"fast_layout": False}))
        if opts.torch_kernels and opts.device.type == "cpu" and dtype == torch.float32:
            # What the default was before the C step, and is where it is not compiled (LLAMA_NATIVE=0).
            variants.append((f"llama LLAMA_NATIVE=0{suffix}", dtype, {"layout": "transposed"}))
        if opts.cuda_graph:
            variants.append((f"llama cuda_graph=True{suffix}", dtype, {"cuda_graph": True}))
        if opts.compile:
            variants.append((f"llama compile=True{suffix}", dtype, {"compile": True}))
    for mode in opts.quantize:
        group = (opts.group_size or quantization.DEFAULT_GROUP_SIZE) if mode == "int4" else None
        dtype = quantization.default_dtype(opts.device)
        name = f"llama {mode}" + (f" g{group}" if group else "")
        if opts.eager or not opts.compile:  # with --compile, the eager run only if asked (it holds its own copy)
            variants.append((name, dtype, {"quantize_mode": mode, "group_size": group}))
        if opts.compile:
            variants.append((name + " compile=True", dtype, {"quantize_mode": mode, "group_size": group,
                                                        "compile": True}))
    return variants


def bench_shape(shape: str, opts, bandwidth: float, tokenizer: Tokenizer) -> Dict:
    device, dtype = opts.device, opts.dtypes[0]
    max_batch = max(opts.batch_sizes)
    args = ModelArgs(
        **SHAPES[shape],
        max_seq_len=opts.prompt_len + opts.gen_len,
        max_batch_size=max_batch,
    )
    variants = our_variants(opts)
    runners = []
    llama2c = None
    if opts.ckpt_dir:  # each of ours built from the checkpoint, one at a time
        for name, variant_dtype, options in variants:
            print(f"  [{shape}] building {name} from {opts.ckpt_dir}", flush=True)
            runners.append(OurRunner(name, None, args, opts.tokenizer_path, device, variant_dtype, ckpt_dir=opts.ckpt_dir,
                                     **options))
    else:
        torch.manual_seed(0)
        state = random_weights(args, seed=0, device=device, dtype=torch.float32 if len(opts.dtypes) > 1 or opts.quantize
                               else dtype)
        # llama2.c reads them from its own file; transformers copies them (permuting q
        # and k); ours then takes copies, or by assignment.
        if opts.llama2c:
            llama2c = Llama2cRunner(opts.llama2c, opts.llama2c_tokenizer, state, args, opts.tmp,
                                    torch.get_num_threads())
        theirs = [TheirRunner(state, args, device, d) for d in opts.transformers_dtypes] if opts.transformers else []
        for name, variant_dtype, options in variants:
            weights = {k: v.to(variant_dtype) if v.dtype != variant_dtype or len(variants) > 1 else v
                       for k, v in state.items()}
            if options.get("quantize_mode"):
                weights = state  # quantized from the fp32 values, as build does from the checkpoint
            # from_model lays the weights out as build would by default (or as the variant asks).
            runners.append(OurRunner(name, weights, args, tokenizer, device, variant_dtype, **options))
            del weights
        runners += theirs
        if opts.llamacpp:
            folder = Path(opts.tmp) / f"llamacpp-{shape}"
            folder.mkdir()
            paths = write_llamacpp_models(Path(opts.llamacpp), state, args, opts.tokenizer_path, folder,
                                          torch.get_num_threads())
            runners += [LlamaCppRunner(kind, path, args, torch.get_num_threads()) for kind, path in paths.items()]
        del state

    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, args.vocab_size, (max_batch, opts.prompt_len), generator=gen)
    ceiling = bandwidth / bytes_per_token(args, dtype)
    result = {"shape": shape, "args": SHAPES[shape], "bytes_per_token": bytes_per_token(args, dtype),
              "ceiling_tokens_per_s": ceiling, "libraries": {}, "baseline": runners[0].name}

    # Warm-up (and compilation), then a check that both decode the same tokens.
    for runner in runners:
        start = time.perf_counter()
        for batch in opts.batch_sizes:
            if batch > getattr(runner, "max_batch", batch):
                continue
            for _ in range(opts.warmup):
                runner.steps(prompts[:batch], opts.gen_len)
        print(f"  [{shape}] warm-up of {runner.name}: {time.perf_counter() - start:.1f} s", flush=True)
    # Only runs of the same numbers (the baseline's dtype, unquantized) must agree.
    result["same_greedy_tokens"] = same_tokens([r for r in runners if r.group == runners[0].group], prompts[:1],
                                               min(opts.gen_len, 16))

    for runner in runners:
        result["libraries"][runner.name] = {
            "memory_mb": runner.memory(prompts[:1], opts.gen_len, device) / 2**20,
            "model_mb": runner.model_bytes / 2**20,
            "bytes_per_token": runner.bytes_per_token,
            "batches": {},
        }
    # The ceiling uses the bandwidth of the moment: on a shared machine it drifts.
    bandwidth = read_bandwidth(device, gib=4.0 if device.type == "cuda" else 1.0)
    ceiling = bandwidth / bytes_per_token(args, dtype)
    result.update(read_bandwidth_bytes_per_s=bandwidth, ceiling_tokens_per_s=ceiling)
    if llama2c is not None:
        llama2c.rate(opts.prompt_len + opts.gen_len)  # warm-up: the file into the page cache
        result["libraries"][llama2c.name] = {"memory_mb": None, "model_mb": None, "batches": {}}
    for batch in opts.batch_sizes:
        times = {runner.name: [] for runner in runners}
        rates = []
        for _ in range(opts.runs):
            for runner in runners:  # alternate, so drift in the machine hits all alike
                if batch <= getattr(runner, "max_batch", batch):
                    times[runner.name].append(runner.steps(prompts[:batch], opts.gen_len))
            if llama2c is not None and batch == 1:  # llama2.c decodes one sequence at a time
                rates.append(llama2c.rate(opts.prompt_len + opts.gen_len))
        if rates:
            entry = {"decode_tokens_per_s": statistics.median(rates), "ttft_ms": None,
                     "prefill_tokens_per_s": None, "decode_runs": rates}
            entry["fraction_of_ceiling"] = entry["decode_tokens_per_s"] / ceiling
            result["libraries"][llama2c.name]["batches"][batch] = entry
            print(f"  [{shape}] {llama2c.name}, batch 1: decode {entry['decode_tokens_per_s']:.1f} tok/s "
                  f"({entry['fraction_of_ceiling']:.0%} of {ceiling:.0f})", flush=True)
        for runner in runners:
            if not times[runner.name]:
                continue
            entry = summarize(times[runner.name], batch, opts.prompt_len)
            if batch == 1 and entry["decode_tokens_per_s"]:
                # Each run's own ceiling: the bytes its weights take (quantized, bf16, ...).
                own_ceiling = bandwidth / result["libraries"][runner.name]["bytes_per_token"]
                entry["fraction_of_ceiling"] = entry["decode_tokens_per_s"] / own_ceiling
                entry["ceiling_tokens_per_s"] = own_ceiling
            result["libraries"][runner.name]["batches"][batch] = entry
            # As measured, so that a run cut short still shows what it got.
            print(f"  [{shape}] {runner.name}, batch {batch}: decode {entry['decode_tokens_per_s']:.1f} tok/s"
                  + (f" ({entry['fraction_of_ceiling']:.0%} of {entry['ceiling_tokens_per_s']:.0f})"
                     if "fraction_of_ceiling" in entry else "")
                  + f", first token {entry['ttft_ms']:.1f} ms", flush=True)
    if any(isinstance(r, LlamaCppRunner) for r in runners):
        result["vs_llamacpp"] = versus_llamacpp(result, runners)
    return result


def versus_llamacpp(result: Dict, runners: List) -> Dict[str, Dict[str, float]]:
    """Ours over llama.cpp at batch 1, mode by mode (our first row of the mode against the GGUF
    type of the same width), decode and prefill, as medians of the run-by-run ratios."""
    libs, ratios = result["libraries"], {}
    for runner in runners:
        if not isinstance(runner, LlamaCppRunner):
            continue
        ours = next((r.name for r in runners if isinstance(r, OurRunner) and
                     r.group == (runner.mode or str(torch.float32))), None)
        if ours is None or 1 not in libs[ours]["batches"]:
            continue
        mine, theirs = libs[ours]["batches"][1], libs[runner.name]["batches"][1]
        ratio = {"decode": paired_ratio(mine["decode_runs"], theirs["decode_runs"]),
                 "prefill": paired_ratio(mine["prefill_runs"], theirs["prefill_runs"])}
        ratios[f"{ours} / {runner.name}"] = ratio
        print(f"  [{result['shape']}] {ours} / {runner.name}: decode {ratio['decode']:.2f}x, "
              f"prefill {ratio['prefill']:.2f}x", flush=True)
    return ratios


def number(value, spec: str) -> str:
    """`value` formatted, or "-" where a library does not report it (llama2.c: prefill, memory)."""
    return "-" if value is None else format(value, spec)


def same_tokens(runners: List[Runner], prompt: torch.Tensor, gen_len: int) -> Optional[bool]:
    """Whether every library's greedy continuation of `prompt` is the same (a check of the weight conversion)."""
    outputs = []
    for runner in runners:
        if isinstance(runner, OurRunner):
            tokens, _ = runner.generator.generate(prompt.tolist(), max_gen_len=gen_len, temperature=0)
            outputs.append(tokens[0])
        elif isinstance(runner, LlamaCppRunner):
            outputs.append(runner.greedy(prompt[0].tolist(), gen_len))
        else:
            with torch.inference_mode():
                out = runner.model.generate(
                    prompt.to(runner.device), attention_mask=torch.ones_like(prompt, device=runner.device),
                    max_new_tokens=gen_len, do_sample=False,
                )
            generated = out[0, prompt.shape[1]:].tolist()
            eos = 2
            outputs.append(generated[: generated.index(eos)] if eos in generated else generated)
    return all(o == outputs[0] for o in outputs) if len(outputs) > 1 else None


def paired_ratio(runs: List[float], baseline_runs: List[float]) -> float:
    """Median over the alternating runs of run i's tokens/s over the baseline's run i."""
    return statistics.median(a / b for a, b in zip(runs, baseline_runs))


def table_rows(results: List[Dict]):
    """(shape, library, batch, entry, ratio vs transformers, fraction of ceiling, memory MB,
    ratio vs our baseline) per row."""
    for r in results:
        libs = r["libraries"]
        theirs = next((n for n in libs if n.startswith("transformers")), None)
        ours = r.get("baseline")
        for name, lib in libs.items():
            for batch, e in lib["batches"].items():
                ratio = ""
                if theirs and name != theirs and not name.startswith("transformers") and batch in libs[theirs]["batches"]:
                    ratio = f"{e['decode_tokens_per_s'] / libs[theirs]['batches'][batch]['decode_tokens_per_s']:.2f}x"
                vs_ours = ""
                if ours in libs and e.get("decode_runs") and libs[ours]["batches"][batch].get("decode_runs"):
                    vs_ours = f"{paired_ratio(e['decode_runs'], libs[ours]['batches'][batch]['decode_runs']):.2f}x"
                frac = f"{100 * e['fraction_of_ceiling']:.0f}%" if "fraction_of_ceiling" in e else ""
                yield r["shape"], name, batch, e, ratio, frac, lib["memory_mb"], vs_ours


def print_table(results: List[Dict], bandwidth: float) -> None:
    print(f"\nmeasured read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    width = max([24] + [len(name) for _, name, *_ in table_rows(results)])
    header = f"{'shape':>5} {'library':<{width}} {'batch':>5} {'decode tok/s':>12} {'of ceiling':>10} " \
             f"{'vs HF':>6} {'vs ours':>7} {'prefill tok/s':>13} {'TTFT ms':>8} {'mem MB':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        for shape, name, batch, e, ratio, frac, memory, vs_ours in table_rows([r]):
            print(f"{shape:>5} {name:<{width}} {batch:>5} {e['decode_tokens_per_s']:>12.1f} {frac:>10} "
                  f"{ratio:>6} {vs_ours:>7} {number(e['prefill_tokens_per_s'], '.0f'):>13} "
                  f"{number(e['ttft_ms'], '.1f'):>8} {number(memory, '.0f'):>7}")
        print(f"{r['shape']:>5} ceiling at batch 1: {r['ceiling_tokens_per_s']:.1f} tok/s "
              f"({r['bytes_per_token'] / 1e6:.0f} MB read per token at "
              f"{r.get('read_bandwidth_bytes_per_s', bandwidth) / 1e9:.1f} GB/s); "
              f"same greedy tokens: {r['same_greedy_tokens']}")


def markdown_table(report: Dict) -> str:
    """The results of a JSON report as a Markdown table (for the README)."""
    lines = [
        f"Read bandwidth measured in the run: {report['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; "
        f"{report['machine']['threads']} threads, {report['options']['dtype']}.",
        "",
        "| shape | library | batch | decode tok/s | of ceiling | vs transformers | vs our baseline "
        "| prefill tok/s | TTFT ms | memory MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for shape, name, batch, e, ratio, frac, memory, vs_ours in table_rows([r]):
            lines.append(
                f"| {shape} | {name} | {batch} | {e['decode_tokens_per_s']:.1f} | {frac} | {ratio} | {vs_ours} | "
                f"{number(e['prefill_tokens_per_s'], '.0f')} | {number(e['ttft_ms'], '.1f')} | {number(memory, '.0f')} |"
            )
        lines.append(
            f"| {r['shape']} | ceiling at batch 1 | | {r['ceiling_tokens_per_s']:.1f} | "
            f"{r['bytes_per_token'] / 1e6:.0f} MB/token at "
            f"{r.get('read_bandwidth_bytes_per_s', report['read_bandwidth_bytes_per_s']) / 1e9:.1f} GB/s | "
            f"same greedy tokens: {r['same_greedy_tokens']} | | | |"
        )
    return "\n".join(lines)


def plot(results: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for name, lib in r["libraries"].items():
            batches = sorted(lib["batches"], key=int)
            ax.plot(batches, [lib["batches"][b]["decode_tokens_per_s"] for b in batches], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{r['shape']} shape")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def write_random_checkpoint(out_dir: Path, shape: str, tokenizer_path: Path) -> None:
    """A one-shard bf16 Meta-format checkpoint of `shape` with random weights
    (each matrix std 1/sqrt(fan-in), as `random_weights`), written without
    holding it in memory: each tensor is filled in a file-backed mapping,
    which `torch.save` then streams into the shard."""
    import shutil

    from llama.model import ffn_hidden_dim

    checkpoint.require_new_dir(out_dir)
    args = ModelArgs(**SHAPES[shape])
    args.vocab_size = Tokenizer(str(tokenizer_path)).n_words
    shapes = checkpoint.full_shapes(args)
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    scratch = out_dir / "scratch"
    scratch.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i, (key, full_shape) in enumerate(shapes.items()):
        numel = 1
        for n in full_shape:
            numel *= n
        t = torch.from_file(str(scratch / f"{i}.bin"), shared=True, size=numel, dtype=torch.bfloat16)
        t = t.view(full_shape)
        if len(full_shape) == 1:
            t.fill_(1.0)
        else:
            fan_in = full_shape[1]
            std = 1.0 if key == "tok_embeddings.weight" else (3.0 if key == "output.weight" else 1.0) * fan_in**-0.5
            for rows in t.split(1024):
                rows.copy_(torch.randn(rows.shape, generator=gen) * std)
        state[key] = t
    (out_dir / "params.json").write_text(json.dumps(checkpoint.params_dict(args), indent=2) + "\n")
    torch.save(state, out_dir / "consolidated.00.pth")
    del state
    shutil.rmtree(scratch)
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    print(f"wrote {out_dir} ({shape} shape, bf16, hidden {hidden})")


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown-from", metavar="JSON", default=None,
                        help="print an earlier run's results as a Markdown table, and stop")
    cuda = torch.cuda.is_available()
    parser.add_argument("--shapes", default="15M,100M,7B" if cuda else "15M,100M",
                        help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per library and batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per library and batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None,
                        help="float32, float16 or bfloat16, or several, comma-separated: each is run (ours and "
                             "transformers'); the first is the baseline (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--transformers-dtype", default=None,
                        help="the dtypes to run transformers in, comma-separated (default: every --dtype)")
    parser.add_argument("--torch-kernels", action="store_true",
                        help="add a row for fp32 on the CPU without the C step: torch's transposed layout, "
                             "as with LLAMA_NATIVE=0")
    parser.add_argument("--no-fast-layout", action="store_true",
                        help="also run ours built with fast_layout=False (Meta's layout, weights left in place)")
    parser.add_argument("--llama2c", metavar="BINARY", default=None,
                        help="also run llama2.c's `run` binary (built with `make runomp`) on the same weights")
    parser.add_argument("--llama2c-tokenizer", metavar="PATH", default=None,
                        help="llama2.c's tokenizer.bin (default: the one beside BINARY)")
    parser.add_argument("--llamacpp", metavar="SRC", default=None,
                        help="also run llama.cpp (llama-cpp-python) on the same weights as F32, Q8_0 and Q4_0 GGUF, "
                             "converted with SRC/convert_hf_to_gguf.py (SRC: a llama.cpp source tree), at batch 1")
    parser.add_argument("--quantize", default="", help="also run ours quantized: int8, int4 or int8,int4 "
                        "(bf16 activations)")
    parser.add_argument("--group-size", type=int, default=None, help="int4 group size (default: the library's)")
    parser.add_argument("--ckpt-dir", default=None,
                        help="build ours from this Meta-format checkpoint (e.g. a 7B-shape one written once "
                             "with --write-ckpt) instead of random weights in memory; transformers is skipped")
    parser.add_argument("--write-ckpt", default=None, metavar="DIR",
                        help="write a bf16 random checkpoint of the (one) shape to DIR, tensor by tensor, and stop")
    parser.add_argument("--compile", action="store_true", help="also run ours built with compile=True")
    parser.add_argument("--cuda-graph", action="store_true", help="also run ours built with cuda_graph=True (CUDA)")
    parser.add_argument("--no-eager", dest="eager", action="store_false",
                        help="with --compile or --cuda-graph, skip the eager run")
    parser.add_argument("--no-transformers", dest="transformers", action="store_false")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    parser.add_argument("--plot", nargs="?", const="bench.png", default=None, help="draw tokens/s against batch size")
    opts = parser.parse_args(argv)
    opts.shapes = opts.shapes.split(",")
    for shape in opts.shapes:
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    opts.batch_sizes = [int(b) for b in opts.batch_sizes.split(",")]
    opts.device = distributed.choose_device(opts.device)
    opts.dtypes = [distributed.choose_dtype(opts.device, d) for d in (opts.dtype or "").split(",") if d] or [
        distributed.choose_dtype(opts.device, None)]
    opts.dtype = opts.dtypes[0]
    opts.transformers_dtypes = [distributed.choose_dtype(opts.device, d) for d in opts.transformers_dtype.split(",")
                                ] if opts.transformers_dtype else opts.dtypes
    opts.quantize = [q for q in opts.quantize.split(",") if q]
    for mode in opts.quantize:
        if mode not in quantization.MODES:
            parser.error(f"unknown --quantize {mode!r}; choose int8, int4 or both")
    if opts.group_size is not None and opts.group_size not in quantization.GROUP_SIZES:
        parser.error(f"--group-size must be one of {', '.join(map(str, quantization.GROUP_SIZES))}")
    if opts.ckpt_dir:
        opts.transformers = False
        if opts.torch_kernels:
            parser.error("--torch-kernels lays out random weights in memory: run it without --ckpt-dir "
                         "(for a checkpoint, set LLAMA_NATIVE=0 instead)")
    if opts.llama2c:
        if opts.device.type != "cpu" or opts.dtypes != [torch.float32] or opts.ckpt_dir:
            parser.error("--llama2c compares fp32 on the CPU from random weights: run it without "
                         "--device/--dtype/--ckpt-dir")
        if not Path(opts.llama2c).is_file():
            parser.error(f"--llama2c {opts.llama2c}: no such file")
        opts.llama2c_tokenizer = opts.llama2c_tokenizer or str(Path(opts.llama2c).with_name("tokenizer.bin"))
        if not Path(opts.llama2c_tokenizer).is_file():
            parser.error(f"llama2.c's tokenizer {opts.llama2c_tokenizer} not found; give it with --llama2c-tokenizer")
    if opts.llamacpp:
        if opts.device.type != "cpu" or opts.ckpt_dir:
            parser.error("--llamacpp compares on the CPU from random weights: run it without --device/--ckpt-dir")
        if not (Path(opts.llamacpp) / "convert_hf_to_gguf.py").is_file():
            parser.error(f"--llamacpp {opts.llamacpp}: no convert_hf_to_gguf.py there (give a llama.cpp source "
                         "tree, e.g. llama-cpp-python's vendor/llama.cpp)")
        missing = [m for m in ("llama_cpp", "gguf") if not importable(m)]
        if missing:
            parser.error(f"--llamacpp needs {' and '.join(missing)}: see benchmarks/README.md (llama.cpp row)")
        if not LLAMA2_TOKENIZER.is_file():
            parser.error(f"--llamacpp needs a Llama 2 tokenizer.model of the shapes' 32000 pieces for llama.cpp's "
                         f"converter: set LLAMA2_TOKENIZER (looked for {LLAMA2_TOKENIZER})")
    # Checked now, not after a minute of benchmarking.
    needed = []
    if not opts.markdown_from and opts.device.type == "cpu" and not importable("psutil"):
        needed.append("psutil (memory on the CPU)")
    if opts.plot and not importable("matplotlib"):
        needed.append("matplotlib (--plot)")
    if needed:
        parser.error(f"this run needs {' and '.join(needed)}: install them with pip install -e \".[bench]\"")
    if opts.transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed (pip install -e .[bench]): benchmarking this library alone")
            opts.transformers = False
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.markdown_from:
        print(markdown_table(json.loads(Path(opts.markdown_from).read_text())))
        return 0
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.device.type == "cuda":
        torch.cuda.set_device(opts.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {opts.device}, dtype {opts.dtype}")
    bandwidth = read_bandwidth(opts.device, gib=4.0 if opts.device.type == "cuda" else 1.0)
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # Only the EOS id matters here (prompts are random ids); any Llama tokenizer will do.
        tokenizer_path = LLAMA2_TOKENIZER
        if not tokenizer_path.is_file():
            tokenizer_path = Path(tmp) / "tokenizer.model"
            train_tokenizer(tokenizer_path)
        tokenizer = Tokenizer(str(tokenizer_path))
        opts.tokenizer_path = tokenizer_path
        opts.tmp = tmp
        if opts.write_ckpt:
            write_random_checkpoint(Path(opts.write_ckpt), opts.shapes[0], tokenizer_path)
            return 0
        results = [bench_shape(shape, opts, bandwidth, tokenizer) for shape in opts.shapes]

    print_table(results, bandwidth)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(opts.device),
            "gpu": torch.cuda.get_device_name(opts.device) if opts.device.type == "cuda" else None,
        },
        "options": {k: str(v) if isinstance(v, (torch.device, torch.dtype, Path)) else
                    [str(d) for d in v] if k in ("dtypes", "transformers_dtypes") else v
                    for k, v in vars(opts).items()},
        "read_bandwidth_bytes_per_s": bandwidth,
        "results": results,
    }
    Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {opts.json}")
    if opts.plot:
        plot(results, opts.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
