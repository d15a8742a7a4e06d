"""End to end: a tiny quantized Llama served by vLLM's OpenAI server on 127.0.0.1 (CPU).

Greedy completions from the server must equal, token for token, the same quantized model run in
transformers, for both ways in:

* pre-quantized: a checkpoint written from ``flute.quantize_model`` (3-bit, group 64, learned
  tables, so q/k/v and gate/up each carry a different table) loaded with no ``--quantization``;
* quantize at load: the unquantized checkpoint with ``--quantization flute`` (defaults: 4-bit,
  group 64, NF table), compared with ``quantize_model(bits=4, group_size=64)`` in transformers;

and, when vLLM's CPU backend runs it here, the pre-quantized model at tensor-parallel size 2.

Runs in the vLLM venv (``.ci/vllm_env.sh``); skipped where vLLM is not installed.
Set ``FLUTE_VLLM_E2E_LOG`` to a folder to keep the server logs.
"""
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

import flute  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VOCAB = 512
NEW_TOKENS = 12
NUM_PROMPTS = 4          # prompts compared per server (the last one is sent as text)
MIN_MARGIN_ULPS = 6      # a greedy step counts as unambiguous above this top-1/top-2 gap
SERVER_START_TIMEOUT = 420  # seconds; engine start is ~20-60 s on 2 cores
REQUEST_TIMEOUT = 120


# -- the tiny model --------------------------------------------------------------------------------
def build_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def build_model():
    """A random 2-layer Llama with peaky logits: a large output projection whose rows have
    log-normal norms, so that the top token usually stands clear of the second."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        initializer_range=0.05)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        model.lm_head.weight.normal_(0.0, 0.5, generator=g)
        model.lm_head.weight.mul_(torch.exp(torch.randn(VOCAB, 1, generator=g)))
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    return model.to(torch.bfloat16).eval()


def save_checkpoint(model, path, tokenizer_dir):
    """config.json (+ quantization_config when quantized) and model.safetensors, the layout
    ``save_pretrained`` produces: flute layers as
    ``<module>.qcodes/.scales/[.offsets]/.table/.qmeta``."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)


def assert_same_checkpoint(a, b):
    """Same tensors (names, dtypes, values) and the same essential quantization settings."""
    from safetensors.torch import load_file
    ta = load_file(os.path.join(a, "model.safetensors"))
    tb = load_file(os.path.join(b, "model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    qa, qb = (json.loads(open(os.path.join(d, "config.json")).read())["quantization_config"]
              for d in (a, b))
    for k in ("quant_method", "format_version", "bits", "group_size", "offsets"):
        assert qa.get(k) == qb.get(k), k


def hf_greedy(model, ids):
    """Greedy continuation of ``ids`` in transformers and its smallest top-1/top-2 logit gap,
    in units of the bf16 spacing at the top logit (0 = a tie that either engine may break)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    margin = float("inf")
    for scores in out.scores:
        top = torch.topk(scores[0].float(), 2).values
        ulp = torch.finfo(torch.bfloat16).eps * top[0].abs().clamp_min(1e-3)
        margin = min(margin, ((top[0] - top[1]) / ulp).item())
    return out.sequences[0, len(ids):].tolist(), margin


def pick_prompts(models, candidates=48):
    """Seeded random prompts whose greedy paths are unambiguous for every model: bf16 logits of
    two engines differ by rounding, so a near-tie could flip either way and prove nothing."""
    g = torch.Generator().manual_seed(5)
    chosen = []
    for _ in range(candidates):
        n = int(torch.randint(3, 24, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        results = []
        for m in models:
            toks, margin = hf_greedy(m, ids)
            if margin < MIN_MARGIN_ULPS:
                break
            results.append(toks)
        else:
            chosen.append((ids, results))
            if len(chosen) == NUM_PROMPTS:
                break
    assert len(chosen) >= 3, "too few unambiguous prompts; the tiny model is too flat"
    return chosen


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_e2e")
    tok = build_tokenizer(root / "tok")
    fp = build_model()
    save_checkpoint(fp, root / "fp", root / "tok")
    online = flute.quantize_model(copy.deepcopy(fp), bits=4, group_size=64, progress=False)
    pre = flute.quantize_model(copy.deepcopy(fp), bits=3, group_size=64, learned_table=True,
                               progress=False)
    save_checkpoint(pre, root / "w3", root / "tok")
    if getattr(pre, "hf_quantizer", None) is not None:
        # flute's transformers integration is there: serve what save_pretrained writes, after
        # checking that it is the layout written by hand above
        pre.save_pretrained(root / "w3_hf")
        assert_same_checkpoint(root / "w3_hf", root / "w3")
        for name in os.listdir(root / "tok"):
            shutil.copy(root / "tok" / name, root / "w3_hf")
        shutil.rmtree(root / "w3")
        os.rename(root / "w3_hf", root / "w3")
    with open(root / "w3" / "config.json") as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "flute"
    chosen = pick_prompts([pre, online])
    prompts = [ids for ids, _ in chosen]
    text = " ".join(f"w{i}" for i in prompts[-1])
    assert tok(text)["input_ids"] == prompts[-1]
    want = {"pre": [t[0] for _, t in chosen], "online": [t[1] for _, t in chosen]}
    fp_greedy = [hf_greedy(fp, ids)[0] for ids in prompts]
    # the quantized models differ from the float one: matching them is not vacuous
    assert want["pre"] != fp_greedy and want["online"] != fp_greedy
    return dict(root=root, want=want, prompts=prompts, text=text)


# -- the server ------------------------------------------------------------------------------------
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


def http(url, payload=None, timeout=REQUEST_TIMEOUT):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _OPENER.open(req, timeout=timeout) as r:
        return r.status, r.read().decode()


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, stopped on exit."""

    def __init__(self, model_dir, log_path, extra_args=(), extra_env=None, eager=True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ)
        env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1", VLLM_DO_NOT_TRACK="1", VLLM_HOST_IP="127.0.0.1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                   VLLM_LOGGING_LEVEL="INFO")
        tmp = os.path.join(os.path.dirname(log_path), "tmp")
        os.makedirs(tmp, exist_ok=True)
        env["TMPDIR"] = tmp  # vLLM's rendezvous files land here, not in /tmp
        env.update(extra_env or {})
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                    "--model", str(model_dir), "--served-model-name", "tiny",
                    "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16",
                    "--max-model-len", "256", "--max-num-seqs", "4", "--seed", "0",
                    *(["--enforce-eager"] if eager else []), *extra_args]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self):
        deadline = time.time() + SERVER_START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n"
                                   + self.tail())
            try:
                if http(self.url + "/health", timeout=5)[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM server not ready in {SERVER_START_TIMEOUT} s:\n" + self.tail())

    def complete(self, prompt):
        status, body = http(self.url + "/v1/completions", dict(
            model="tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
            return_token_ids=True))
        assert status == 200, body
        return json.loads(body)["choices"][0]

    def tail(self, n=60):
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        self.log.close()

    def __enter__(self):
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()


def log_dir(checkpoints):
    d = os.environ.get("FLUTE_VLLM_E2E_LOG") or str(checkpoints["root"])
    os.makedirs(d, exist_ok=True)
    return d


def served_greedy(checkpoints, model, name, extra_args=(), extra_env=None, eager=True):
    prompts = checkpoints["prompts"]
    t0 = time.time()
    with Server(checkpoints["root"] / model, os.path.join(log_dir(checkpoints), f"{name}.log"),
                extra_args, extra_env, eager) as server:
        ready = time.time() - t0
        got = [server.complete(p)["token_ids"] for p in prompts[:-1]]
        got.append(server.complete(checkpoints["text"])["token_ids"])
        log = server.tail(400)
    print(f"[{name}] server ready in {ready:.0f} s; total {time.time() - t0:.0f} s")
    return got, log


def check_equal(got, want):
    assert got == want, f"vLLM {got}\n!= transformers {want}"


def test_prequantized_checkpoint(checkpoints):
    got, log = served_greedy(checkpoints, "w3", "prequantized")
    assert "flute" in log
    check_equal(got, checkpoints["want"]["pre"])


def test_prequantized_compiled(checkpoints, tmp_path):
    """Without --enforce-eager vLLM traces the model with torch.compile (Dynamo + Inductor on
    CPU); torch.ops.flute.qgemm's fake implementation lets it into the graph. A fresh compile
    cache makes every run trace."""
    got, log = served_greedy(checkpoints, "w3", "prequantized_compiled",
                             extra_env={"VLLM_CACHE_ROOT": str(tmp_path / "vllm_cache")},
                             eager=False)
    assert "CompilationMode.NONE" not in log
    check_equal(got, checkpoints["want"]["pre"])


def test_quantize_at_load(checkpoints):
    got, _ = served_greedy(checkpoints, "fp", "online", ["--quantization", "flute"])
    check_equal(got, checkpoints["want"]["online"])


def test_prequantized_tensor_parallel_2(checkpoints):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("TP=2 on vLLM-CPU needs at least 2 CPUs (one OpenMP thread group per rank)")
    half = len(cpus) // 2
    # vLLM-CPU binds each rank's OpenMP threads to a NUMA node, and refuses when there are fewer
    # nodes than ranks; bind them to disjoint CPU sets by hand instead.
    bind = "|".join(",".join(map(str, part)) for part in (cpus[:half], cpus[half:2 * half]))
    try:
        got, _ = served_greedy(checkpoints, "w3", "prequantized_tp2",
                               ["--tensor-parallel-size", "2",
                                "--distributed-executor-backend", "mp"],
                               {"VLLM_CPU_OMP_THREADS_BIND": bind})
    except (RuntimeError, TimeoutError) as e:
        if "tensor" in str(e).lower() and "not support" in str(e).lower():
            pytest.skip(f"vLLM-CPU cannot run TP=2 here: {e}")
        raise
    check_equal(got, checkpoints["want"]["pre"])
