"""LoRA adapters against peft (the reference implementation), on the bundled model as transformers reads
its GGUF, and on tiny random ChatGLM3 / GLM-4 checkpoints in both layouts.

Everything compared runs in float32 with float weights (quantization "none": the GGUF's blocks dequantized
the way transformers does it), so prompt logprobs must agree within TOL and greedy tokens exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft  # a test dependency: the reference LoRA implementation
import pytest
import torch
import transformers
from glm_checkpoints import write_tiny_checkpoint
from safetensors.torch import load_file, save_file

from glmserve import LLM, SamplingParams
from glmserve.engine.layers import lora as lora_layer
from glmserve.engine.lora import UnknownAdapterError
from glmserve.model_path import find_bundled_model

TOL = 1e-4
NUM_TOKENS = 16
FLOAT = dict(dtype="float32", quantization="none", activation_precision="float", kv_cache_memory=32 * 2**20)
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GLM_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def make_adapter(base, out: Path, targets: list[str], r: int, seed: int, **options) -> Path:
    """A peft adapter with random A and B (B scaled so the change is clear but not wild)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=16, target_modules=targets, init_lora_weights=False, **options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    model.save_pretrained(out)
    model.unload()
    return out


def peft_logprobs(base, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1]: log-prob of each prompt token after the ones before it."""
    model = peft.PeftModel.from_pretrained(base, adapter).eval() if adapter else base
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    if adapter:
        model.unload()
    return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def peft_greedy(base, adapter: Path, ids: list[int]) -> list[int]:
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS, do_sample=False)
    model.unload()
    return out[0, len(ids) :].tolist()


def our_logprobs(llm: LLM, ids: list[int], lora: str | None) -> torch.Tensor:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    entries = llm.generate({"prompt_token_ids": ids}, params, lora=lora)[0].prompt_logprobs
    return torch.tensor([entry[t] for entry, t in zip(entries[1:], ids[1:], strict=True)])


def greedy(llm: LLM, prompts: list[list[int]], loras) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora=loras)]


# -- the bundled model (Llama layout: q/k/v and gate/up merged on our side) ------------------------------
@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    path = find_bundled_model()
    base = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    root = tmp_path_factory.mktemp("lora")
    adapters = {
        "all": make_adapter(base, root / "all", LLAMA_ALL, r=8, seed=0),
        "qv": make_adapter(base, root / "qv", ["q_proj", "v_proj"], r=4, seed=1, use_rslora=True),
    }
    llm = LLM(path, lora_modules=adapters, **FLOAT)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in ("What is the capital of France?", "Name a fruit.")]
    return base, adapters, llm, prompts


@pytest.mark.parametrize("name", ["all", "qv"])
def test_prompt_logprobs_equal_peft(bundled, name):
    base, adapters, llm, prompts = bundled
    expected = peft_logprobs(base, adapters[name], prompts[0])
    torch.testing.assert_close(our_logprobs(llm, prompts[0], name), expected, atol=TOL, rtol=0)
    # and the adapter does change the model
    assert (expected - peft_logprobs(base, None, prompts[0])).abs().max() > 0.05


def test_greedy_tokens_equal_peft(bundled):
    base, adapters, llm, prompts = bundled
    for name in adapters:
        assert greedy(llm, prompts[:1], name)[0] == peft_greedy(base, adapters[name], prompts[0])


def test_mixed_batch_equals_each_alone(bundled):
    _, _, llm, prompts = bundled
    loras = [None, "all", "qv", "all", None, "qv"]
    batch = [prompts[i % 2] for i in range(len(loras))]
    mixed = greedy(llm, batch, loras)
    alone = [greedy(llm, [p], lora)[0] for p, lora in zip(batch, loras, strict=True)]
    assert mixed == alone
    assert mixed[1] != mixed[5]  # same prompt, different adapters


def test_gemm_form_equals_native_rows(bundled, monkeypatch):
    """Prefill-sized steps take the masked-GEMM form; it computes the same as the per-row kernel."""
    _, _, llm, prompts = bundled
    native = our_logprobs(llm, prompts[0], "all")
    monkeypatch.setattr(lora_layer, "MAX_NATIVE_ROWS", 0)
    torch.testing.assert_close(our_logprobs(llm, prompts[0], "all"), native, atol=TOL, rtol=0)
    assert greedy(llm, prompts, ["all", "qv"]) == [greedy(llm, [p], a)[0] for p, a in zip(prompts, ["all", "qv"], strict=True)]


def test_prefix_cache_is_per_adapter(bundled):
    _, _, llm, prompts = bundled
    text = "Cache test: " + "a b c d e f g h " * 8  # several full blocks, run by no other test
    long_prompt = llm.get_tokenizer().encode(text)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=0)
    base_first = llm.generate({"prompt_token_ids": long_prompt}, params)[0]
    adapted = llm.generate({"prompt_token_ids": long_prompt}, params, lora="all")[0]
    assert adapted.num_cached_tokens == 0  # the base's blocks hold the base's KV
    again = llm.generate({"prompt_token_ids": long_prompt}, params, lora="all")[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == adapted.outputs[0].token_ids
    first_logprob = [o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]] for o in (base_first, adapted, again)]
    assert abs(first_logprob[0] - first_logprob[1]) > 1e-3 and first_logprob[1] == pytest.approx(first_logprob[2], abs=1e-5)


def test_more_adapters_than_slots_load_on_demand(bundled, tmp_path):
    """max_loras=1: two adapters in one call run one after the other, each reloaded as needed."""
    _, adapters, big, prompts = bundled
    llm = LLM(find_bundled_model(), lora_modules=adapters, max_loras=1, **FLOAT)
    loras = ["all", "qv", None, "all"]
    batch = [prompts[0]] * len(loras)
    assert greedy(llm, batch, loras) == greedy(big, batch, loras)
    assert llm.engine.runner.lora.num_slots == 1 and llm.engine.runner.lora.num_loads >= 3


def test_quantized_base_keeps_the_adapter_in_float(bundled):
    base, adapters, llm, prompts = bundled
    quantized = LLM(find_bundled_model(), dtype="float32", kv_cache_memory=32 * 2**20, lora_modules={"all": adapters["all"]})
    got = our_logprobs(quantized, prompts[0], "all")  # the GGUF's own 4-bit blocks, 8-bit activations
    expected = peft_logprobs(base, adapters["all"], prompts[0])
    assert (got - expected).abs().mean() < 0.05
    assert (our_logprobs(quantized, prompts[0], None) - expected).abs().mean() > 0.1


def test_bad_adapters_are_refused_in_one_line(bundled, tmp_path):
    _, adapters, llm, _ = bundled
    with pytest.raises(UnknownAdapterError):
        llm.generate("hi", SamplingParams(max_tokens=1), lora="nope")
    with pytest.raises(ValueError, match="already loaded"):
        llm.add_lora("all", adapters["all"])
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.add_lora("empty", tmp_path)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((adapters["qv"] / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapters["qv"] / "adapter_model.safetensors")
    name = next(n for n in tensors if n.endswith("q_proj.lora_A.weight"))
    tensors[name] = torch.zeros(4, 4096)  # an adapter of a 4096-wide model
    save_file(tensors, wrong / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"4096 -> 576 features in the adapter but 576 -> 576 in the model") as error:
        llm.add_lora("wrong", wrong)
    assert "\n" not in str(error.value)
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(ValueError, match="bias 'all' is not supported"):
        llm.add_lora("wrong", wrong)
    assert set(llm.engine.loras) == {"all", "qv"}


def test_remove_lora(bundled):
    _, adapters, _, prompts = bundled
    llm = LLM(find_bundled_model(), lora_modules={"qv": adapters["qv"]}, **FLOAT)
    before = greedy(llm, prompts[:1], "qv")
    llm.remove_lora("qv")
    with pytest.raises(UnknownAdapterError):
        greedy(llm, prompts[:1], "qv")
    llm.add_lora("qv", adapters["qv"])
    assert greedy(llm, prompts[:1], "qv") == before


# -- ChatGLM3 / GLM-4: peft on transformers' GlmForCausalLM; ours on both layouts ------------------------
def to_thudm_adapter(adapter: Path, out: Path) -> Path:
    """The same adapter on THUDM's layer names: q/k/v as one query_key_value (A stacked, B block-diagonal:
    rank 3r, so alpha triples to keep alpha / r), o_proj -> dense, gate_up_proj -> dense_h_to_4h,
    down_proj -> dense_4h_to_h."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    renames = {"self_attn.o_proj": "self_attention.dense", "mlp.gate_up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h"}
    converted = {}
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in tensors}
    for i in layers:
        src, dst = f"base_model.model.model.layers.{i}.", f"base_model.model.transformer.encoder.layers.{i}."
        a = [tensors[f"{src}self_attn.{p}.lora_A.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        b = [tensors[f"{src}self_attn.{p}.lora_B.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        converted[f"{dst}self_attention.query_key_value.lora_A.weight"] = torch.cat(a)
        converted[f"{dst}self_attention.query_key_value.lora_B.weight"] = torch.block_diag(*b)
        for old, new in renames.items():
            for which in "AB":
                converted[f"{dst}{new}.lora_{which}.weight"] = tensors[f"{src}{old}.lora_{which}.weight"]
    out.mkdir(parents=True)
    save_file(converted, out / "adapter_model.safetensors")
    config = {**config, "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
              "alpha_pattern": {"query_key_value": 3 * config["lora_alpha"]}}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("preset,prompt", [
    ("chatglm3-6b", [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]),
    ("glm4-9b", [151331, 151333, 151336, 198, 6023, 151337]),
])  # fmt: skip
def test_glm_adapters_equal_peft_in_both_layouts(tmp_path, preset, prompt):
    sizes = {"rope_ratio": None} if preset == "glm4-9b" else {}
    thudm = write_tiny_checkpoint(tmp_path / "thudm", preset=preset, fmt="bin", **sizes)
    glm = write_tiny_checkpoint(tmp_path / "glm", preset=preset, layout="glm", **sizes)
    base = transformers.GlmForCausalLM.from_pretrained(glm, dtype=torch.float32).eval()
    adapter = make_adapter(base, tmp_path / "adapter", GLM_ALL, r=4, seed=2)
    thudm_adapter = to_thudm_adapter(adapter, tmp_path / "thudm_adapter")
    expected = peft_logprobs(base, adapter, prompt)
    expected_tokens = peft_greedy(base, adapter, prompt)
    for model, lora in ((glm, adapter), (thudm, thudm_adapter)):
        llm = LLM(model, dtype="float32", kv_cache_memory=4 * 2**20, block_size=4, lora_modules={"ft": lora})
        torch.testing.assert_close(our_logprobs(llm, prompt, "ft"), expected, atol=TOL, rtol=0)
        assert greedy(llm, [prompt], "ft")[0] == expected_tokens
        assert (our_logprobs(llm, prompt, None) - expected).abs().max() > 1e-2


def test_peft_prefix_tuning_equals_peft(bundled, tmp_path):
    """peft's PREFIX_TUNING on a transformers model: the saved prompt_embeddings become the cache's first
    slots, and the prompt's positions start after them (transformers counts them as past tokens)."""
    _, _, llm, prompts = bundled
    path = find_bundled_model()  # a model of its own: peft's prompt learning rewires the one it wraps
    base = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    torch.manual_seed(3)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=True, encoder_hidden_size=32)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "prefix")
    model = peft.PeftModel.from_pretrained(model.get_base_model(), tmp_path / "prefix").eval()
    llm.add_lora("prefix", tmp_path / "prefix")
    ids = prompts[0]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        expected = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        tokens = list(ids)
        for _ in range(NUM_TOKENS):  # full forwards: peft's generate() drops the prefix under transformers 5
            last = model(input_ids=torch.tensor([tokens])).logits[0, -1]
            last[sorted(llm.engine.stop_token_ids)] = float("-inf")  # as min_tokens bans them
            tokens.append(int(last.argmax()))
    torch.testing.assert_close(our_logprobs(llm, ids, "prefix"), expected, atol=TOL, rtol=0)
    assert greedy(llm, [ids], "prefix")[0] == tokens[len(ids) :]
    assert (expected - our_logprobs(llm, ids, None)).abs().max() > 0.05
    llm.remove_lora("prefix")
