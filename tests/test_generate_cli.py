"""`python -m jaxmoe.generate` end to end (subprocesses, run outside the repository): streamed text,
summary line, JSON output, resident == offloaded, and one-line refusals."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def add(a, b): return a + b"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: the test models' pad 0, bos 1, eos 2


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def add_char_tokenizer(model_dir: Path, vocab_size: int, adds_bos: bool = True, chat_template: str | None = None) -> None:
    """A character-level tokenizer with exactly `vocab_size` tokens, saved with transformers. adds_bos: its
    post-processor puts <s> before a text encoded with special tokens (as Llama's and Mixtral's do; Qwen's do
    not)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)][: vocab_size - len(SPECIALS)]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def model_dir(converted_model, tmp_path_factory):
    _, converted = converted_model("mixtral")
    target = tmp_path_factory.mktemp("cli") / "model"
    shutil.copytree(converted, target)
    config = json.loads((target / "jaxmoe.json").read_text())
    add_char_tokenizer(target, config["vocab_size"])
    return target


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The subprocesses' working directory: not the repository."""
    return tmp_path_factory.mktemp("cwd")


def cli(workdir, *args, timeout=120, **env_overrides):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false", **env_overrides)
    return subprocess.run([sys.executable, "-m", "jaxmoe.generate", *map(str, args)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def offloaded(model_dir, workdir):
    out = workdir / "offloaded.json"
    proc = cli(workdir, "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 8, "--output-json", out,
               "--cache-slots", 3)
    return proc, out


def test_offloaded_run(offloaded, model_dir):
    proc, out = offloaded
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(PROMPT)
    last = proc.stderr.strip().splitlines()[-1]
    for word in ("decode", "tok/s", "hit rate", "policy on-demand"):
        assert word in last, last
    payload = json.loads(out.read_text())
    assert set(payload) >= {"prompt_ids", "generated_ids", "text", "stats"}
    assert payload["prompt_ids"][0] == 1 and len(payload["prompt_ids"]) == 1 + len(PROMPT)  # its bos + characters
    assert 1 <= len(payload["generated_ids"]) <= 8
    assert all(0 <= t < 96 for t in payload["generated_ids"])
    assert proc.stdout.rstrip("\n") == PROMPT + payload["text"]  # exactly what was streamed
    stats = payload["stats"]
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "hit_rate", "h2d_bytes", "stall_s",
                "peak_device_bytes", "cache_slots", "policy"):
        assert key in stats, key
    assert stats["cache_slots"] == 3 and stats["policy"] == "on-demand"
    assert 0.0 <= stats["hit_rate"] <= 1.0 and stats["ttft_s"] > 0 and stats["peak_device_bytes"] > 0
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # the temporary file was renamed


def test_resident_policy_gives_the_same_tokens(offloaded, model_dir, workdir):
    _, offloaded_json = offloaded
    out = workdir / "resident.json"
    proc = cli(workdir, "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 8, "--output-json", out,
               "--policy", "resident")
    assert proc.returncode == 0, proc.stderr
    resident, offload = json.loads(out.read_text()), json.loads(offloaded_json.read_text())
    assert resident["generated_ids"] == offload["generated_ids"]
    assert resident["prompt_ids"] == offload["prompt_ids"]
    assert resident["stats"]["policy"] == "resident" and resident["stats"]["h2d_bytes"] == 0
    assert "policy resident" in proc.stderr.strip().splitlines()[-1]


def test_int8_experts_offloaded_and_resident_agree(model_dir, workdir):
    runs = {}
    for name, extra in (("int8-offloaded", ("--cache-slots", 3)), ("int8-resident", ("--policy", "resident"))):
        out = workdir / f"{name}.json"
        proc = cli(workdir, "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 8, "--output-json", out,
                   "--quantize-experts", "int8", *extra)
        assert proc.returncode == 0, proc.stderr
        assert "experts int8" in proc.stderr.strip().splitlines()[-1]
        runs[name] = json.loads(out.read_text())
    assert runs["int8-offloaded"]["generated_ids"] == runs["int8-resident"]["generated_ids"]
    assert runs["int8-offloaded"]["stats"]["quantize_experts"] == "int8"


@pytest.fixture(scope="module")
def chat_model_dir(model_dir, tmp_path_factory):
    """The same model with a tokenizer that adds no BOS (as Qwen's) and has a chat template."""
    target = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(model_dir, target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (target / name).unlink(missing_ok=True)
    add_char_tokenizer(target, json.loads((target / "jaxmoe.json").read_text())["vocab_size"], adds_bos=False,
                       chat_template=CHAT_TEMPLATE)
    return target


def test_prompt_ids_are_what_the_transformers_tokenizer_gives(model_dir, chat_model_dir):
    """A plain prompt gets the tokenizer's own special tokens (a BOS only where the tokenizer adds one)."""
    from transformers import AutoTokenizer

    from jaxmoe.prompt import prompt_ids
    from jaxmoe.tokenizer import load_tokenizer

    for directory, first in ((model_dir, [1]), (chat_model_dir, [])):
        expected = AutoTokenizer.from_pretrained(str(directory))(PROMPT)["input_ids"]
        assert prompt_ids(load_tokenizer(directory), PROMPT) == expected == first + expected[len(first):]
        assert len(expected) == len(first) + len(PROMPT)


def test_chat_prompt_goes_through_the_chat_template(chat_model_dir, workdir):
    from transformers import AutoTokenizer

    out = workdir / "chat.json"
    proc = cli(workdir, "--model", chat_model_dir, "--prompt", "hi there", "--chat", "--system", "be brief",
               "--max-new-tokens", 4, "--output-json", out, "--cache-slots", 4)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.read_text())
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    rendered = AutoTokenizer.from_pretrained(str(chat_model_dir)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s>system: be brief\n<s>user: hi there\nassistant:"
    expected = AutoTokenizer.from_pretrained(str(chat_model_dir))(rendered, add_special_tokens=False)["input_ids"]
    assert payload["prompt_ids"] == expected and expected.count(1) == 2  # the template's <s> as tokens, no extra BOS
    assert proc.stdout.rstrip("\n") == payload["text"]  # the reply only, not the template


def test_refuses_chat_without_a_template_and_system_without_chat(model_dir, workdir):
    assert_refused(cli(workdir, "--model", model_dir, "--prompt", "x", "--chat"), "--chat", "no chat template")
    assert_refused(cli(workdir, "--model", model_dir, "--prompt", "x", "--system", "s"), "--system", "--chat")


def test_refuses_missing_model_dir(workdir):
    missing = workdir / "no-such-model"
    assert_refused(cli(workdir, "--model", missing, "--prompt", "x"), str(missing), "no such directory")


def test_refuses_bad_sampling_flags_before_loading(workdir):
    missing = workdir / "no-such-model"  # checked only after the flags that need no model
    assert_refused(cli(workdir, "--model", missing, "--prompt", "x", "--temperature", "-1"), "--temperature")
    assert_refused(cli(workdir, "--model", missing, "--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens")


def test_refuses_unconverted_dir(workdir):
    bogus = workdir / "not-a-model"
    bogus.mkdir(exist_ok=True)
    (bogus / "config.json").write_text("{}")
    assert_refused(cli(workdir, "--model", bogus, "--prompt", "x"), "jaxmoe.json", "convert")


def test_refuses_too_few_cache_slots(model_dir, workdir):
    assert_refused(cli(workdir, "--model", model_dir, "--prompt", "x", "--cache-slots", 1), "--cache-slots 1", "top-k")


def test_refuses_existing_output_json(model_dir, workdir):
    existing = workdir / "keep.json"
    existing.write_text("precious\n")
    assert_refused(cli(workdir, "--model", model_dir, "--prompt", "x", "--output-json", existing),
                   "--output-json", "already exists")
    assert existing.read_text() == "precious\n"


def test_output_json_in_a_new_directory(model_dir, workdir):
    out = workdir / "new" / "deeper" / "run.json"
    proc = cli(workdir, "--model", model_dir, "--prompt", "x", "--max-new-tokens", 2, "--output-json", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["prompt_ids"][0] == 1


def test_refuses_output_json_under_a_file(model_dir, workdir):
    blocker = workdir / "plain-file"
    blocker.write_text("not a directory\n")
    assert_refused(cli(workdir, "--model", model_dir, "--prompt", "x", "--output-json", blocker / "run.json"),
                   "--output-json", "is not a directory")
    assert blocker.read_text() == "not a directory\n"


def test_refuses_missing_prompt_file(model_dir, workdir):
    assert_refused(cli(workdir, "--model", model_dir, "--prompt-file", workdir / "absent.txt"), "--prompt-file",
                   "absent.txt")


def test_fused_predictor_flag(offloaded, model_dir, workdir):
    _, offloaded_json = offloaded
    out = workdir / "fused.json"
    proc = cli(workdir, "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 8, "--output-json", out,
               "--cache-slots", 3, "--policy", "presched", "--fuse-predictor", "on")
    assert proc.returncode == 0, proc.stderr
    fused = json.loads(out.read_text())
    assert fused["stats"]["predictor_fused"] is True and fused["stats"]["predictor"] == "gate-lookahead"
    assert fused["generated_ids"] == json.loads(offloaded_json.read_text())["generated_ids"]
    assert_refused(cli(workdir, "--model", model_dir, "--prompt", PROMPT, "--fuse-predictor", "on"),
                   "--fuse-predictor", "presched")


def test_compiled_programs_are_kept_between_runs(offloaded, model_dir, workdir, tmp_path):
    """The persistent compilation cache (jaxmoe.compile_cache): the first run fills it, the second finds
    every program there (no new entry) and generates the same tokens."""
    _, offloaded_json = offloaded
    cache = tmp_path / "xla"
    entries = []
    for run in range(2):
        out = workdir / f"cached-{run}.json"
        proc = cli(workdir, "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 8, "--output-json", out,
                   "--cache-slots", 3, JAXMOE_COMPILE_CACHE=str(cache), JAX_COMPILATION_CACHE_DIR="")
        assert proc.returncode == 0, proc.stderr
        payload = json.loads(out.read_text())
        assert payload["generated_ids"] == json.loads(offloaded_json.read_text())["generated_ids"]
        if run == 0:  # everything compiled in this run: the summary says for how long
            assert payload["stats"]["compile_s"] >= payload["stats"]["ttft_compile_s"] > 0
            assert f"compile {payload['stats']['compile_s']:.1f} s" in proc.stderr.strip().splitlines()[-1]
        entries.append(sorted(p.name for p in cache.glob("*-cache")))
    assert len(entries[0]) >= 5  # embedding, attention + router, experts, slot writes, logits, sampling
    assert entries[1] == entries[0]
