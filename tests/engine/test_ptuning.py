"""ChatGLM's P-Tuning v2 prefixes against the original modeling code's prefix path, on tiny random
ChatGLM2/3 checkpoints.

The reference is transformers' GlmForCausalLM (the same weights in its layout) with the past keys and
values THUDM's `get_prompt` makes from the prefix encoder, written here as modeling_chatglm.py does it:
view(batch, P, layers * 2, groups, kv_channels).permute([2, 1, 0, 3, 4]).split(2), used as the cache
before the prompt, no rotary on them, and the prompt's positions starting at 0 (THUDM's get_position_ids).
Everything in float32: prompt logprobs within TOL, greedy tokens equal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from glm_checkpoints import write_tiny_checkpoint
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from glmserve import LLM, SamplingParams
from glmserve.devtools.random_lora import write_random_lora

TOL = 1e-4
BLOCK_SIZE = 4
PROMPTS = [[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796], [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13]]


def prefix_encoder_weights(config: dict, num_slots: int, projection: bool, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = config["num_layers"] * 2 * config["multi_query_group_num"] * config["kv_channels"]
    weights = {"transformer.prefix_encoder.embedding.weight": torch.randn(num_slots, width, generator=gen)}
    if projection:
        hidden = config["hidden_size"]
        weights |= {
            "transformer.prefix_encoder.trans.0.weight": torch.randn(hidden, width, generator=gen) * 0.1,
            "transformer.prefix_encoder.trans.0.bias": torch.randn(hidden, generator=gen) * 0.1,
            "transformer.prefix_encoder.trans.2.weight": torch.randn(width, hidden, generator=gen),
            "transformer.prefix_encoder.trans.2.bias": torch.randn(width, generator=gen) * 0.1,
        }
    return weights


def write_ptuning_folder(base: Path, out: Path, num_slots: int, projection: bool, seed: int = 7) -> Path:
    """What ChatGLM2's ptuning/ saves: config.json with pre_seq_len, the prefix encoder's weights."""
    config = json.loads((base / "config.json").read_text()) | {"pre_seq_len": num_slots, "prefix_projection": projection}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    torch.save(prefix_encoder_weights(config, num_slots, projection, seed), out / "pytorch_model.bin")
    return out


def thudm_prefix_cache(ptuning: Path) -> DynamicCache:
    """modeling_chatglm.py's PrefixEncoder + get_prompt, batch 1, as a transformers cache."""
    config = json.loads((ptuning / "config.json").read_text())
    w = {k.removeprefix("transformer.prefix_encoder."): v.double() for k, v in torch.load(ptuning / "pytorch_model.bin").items()}
    prefix_tokens = torch.arange(config["pre_seq_len"])[None]
    past = w["embedding.weight"][prefix_tokens]
    if config["prefix_projection"]:
        past = torch.tanh(past @ w["trans.0.weight"].T + w["trans.0.bias"]) @ w["trans.2.weight"].T + w["trans.2.bias"]
    layers, groups, channels = config["num_layers"], config["multi_query_group_num"], config["kv_channels"]
    past = past.view(1, config["pre_seq_len"], layers * 2, groups, channels).permute([2, 1, 0, 3, 4]).split(2)
    cache = DynamicCache()
    for i, kv in enumerate(past):  # kv [2, P, batch, groups, channels] -> transformers' [batch, groups, P, channels]
        cache.update(kv[0].permute(1, 2, 0, 3).float(), kv[1].permute(1, 2, 0, 3).float(), i)
    return cache


def reference_run(model, ptuning: Path, ids: list[int], num_new: int) -> tuple[torch.Tensor, list[int]]:
    """(prompt logprobs [len(ids) - 1], greedy tokens), positions from 0 after the prefix."""
    cache = thudm_prefix_cache(ptuning)
    num_slots = cache.get_seq_length()
    tokens, out = list(ids), []
    with torch.inference_mode():
        step_ids, start = ids, 0
        for _ in range(num_new + 1):
            n = len(step_ids)
            logits = model(
                torch.tensor([step_ids]), cache=cache, position_ids=torch.arange(start, start + n)[None],
                attention_mask=torch.ones(1, num_slots + start + n, dtype=torch.long),
            ).logits[0].float()
            if start == 0:
                prompt_lp = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            token = int(logits[-1].argmax())
            out.append(token)
            tokens.append(token)
            start += n
            step_ids = [token]
    return prompt_lp, out[:num_new]


def ours(llm: LLM, ids: list[int], lora: str | None, num_new: int) -> tuple[torch.Tensor, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=num_new, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate({"prompt_token_ids": ids}, params, lora=lora)[0]
    lp = torch.tensor([entry[t] for entry, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)])
    return lp, out.outputs[0].token_ids


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptuning")
    thudm = write_tiny_checkpoint(root / "thudm", preset="chatglm2-6b")
    reference = transformers.GlmForCausalLM.from_pretrained(
        write_tiny_checkpoint(root / "glm", preset="chatglm2-6b", layout="glm"), dtype=torch.float32
    ).eval()
    folders = {
        "plain": write_ptuning_folder(thudm, root / "plain", num_slots=8, projection=False),  # 2 whole blocks
        "projected": write_ptuning_folder(thudm, root / "projected", num_slots=6, projection=True, seed=8),  # 1.5
    }
    return thudm, reference, folders


@pytest.fixture(scope="module")
def llm(checkpoints):
    thudm, _, folders = checkpoints
    return LLM(thudm, dtype="float32", kv_cache_memory=4 * 2**20, block_size=BLOCK_SIZE, lora_modules=folders)


@pytest.mark.parametrize("name", ["plain", "projected"])
def test_prefix_adapter_equals_original_code(checkpoints, llm, name):
    _, reference, folders = checkpoints
    for ids in PROMPTS:
        expected_lp, expected_tokens = reference_run(reference, folders[name], ids, 8)
        got_lp, got_tokens = ours(llm, ids, name, 8)
        torch.testing.assert_close(got_lp, expected_lp, atol=TOL, rtol=0)
        assert got_tokens == expected_tokens
    base_lp, _ = ours(llm, PROMPTS[-1], None, 1)
    assert (base_lp - expected_lp).abs().max() > 1e-2  # the prefix does change the model


def test_mixed_batch_of_prefixes_lora_and_base_equals_each_alone(checkpoints, llm, tmp_path):
    thudm, _, _ = checkpoints
    llm.add_lora("lora", write_random_lora(thudm, tmp_path / "lora", rank=4, std=0.2))
    loras = [None, "plain", "projected", "lora", "plain", None, "projected"]
    prompts = [PROMPTS[i % 2] for i in range(len(loras))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    batch = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora=loras)]
    alone = [llm.generate({"prompt_token_ids": p}, params, lora=a)[0].outputs[0].token_ids for p, a in zip(prompts, loras, strict=True)]
    assert batch == alone
    assert len({tuple(batch[i]) for i in (0, 1, 2, 3)}) == 4  # every adapter answers differently
    llm.remove_lora("lora")


def test_prefix_blocks_are_shared_and_kept(llm):
    manager = llm.engine.block_manager
    free_before = manager.num_free_blocks
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS * 3], params, lora="plain")
    assert manager.num_free_blocks == free_before  # the prefix's blocks stay held, the sequences' came back
    _, plain = llm.engine.prefixes["plain"]
    assert all(manager.ref_counts[b] == 1 for b in plain.shared_blocks)


def test_prefix_cache_hits_after_an_aligned_prefix(llm):
    long_prompt = [64790, 64792, *range(1000, 1020)]  # run by no other test
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": long_prompt}, params, lora="plain")[0]
    again = llm.generate({"prompt_token_ids": long_prompt}, params, lora="plain")[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.generate({"prompt_token_ids": long_prompt}, params)[0].num_cached_tokens == 0  # not the base's


def test_whole_ptuning_checkpoint_applies_its_prefix_to_every_request(checkpoints, tmp_path):
    """ChatGLM3 finetune_demo's P-Tuning output: the whole model with pre_seq_len and the prefix encoder."""
    thudm, reference, folders = checkpoints
    whole = tmp_path / "whole"
    shutil.copytree(thudm, whole)
    config = json.loads((folders["projected"] / "config.json").read_text())
    (whole / "config.json").write_text(json.dumps(config))
    weights = load_file(whole / "model.safetensors") | torch.load(folders["projected"] / "pytorch_model.bin")
    save_file(weights, whole / "model.safetensors")
    llm = LLM(whole, dtype="float32", kv_cache_memory=4 * 2**20, block_size=BLOCK_SIZE)
    expected_lp, expected_tokens = reference_run(reference, folders["projected"], PROMPTS[1], 6)
    got_lp, got_tokens = ours(llm, PROMPTS[1], None, 6)
    torch.testing.assert_close(got_lp, expected_lp, atol=TOL, rtol=0)
    assert got_tokens == expected_tokens


def test_a_prefix_of_another_shape_is_refused(checkpoints, llm, tmp_path):
    thudm, _, _ = checkpoints
    config = json.loads((thudm / "config.json").read_text())
    wrong_base = tmp_path / "wrong_base"
    wrong_base.mkdir()
    (wrong_base / "config.json").write_text(json.dumps(config | {"num_layers": 3}))
    wrong = write_ptuning_folder(wrong_base, tmp_path / "wrong", num_slots=4, projection=False)
    with pytest.raises(ValueError, match=r"needs \(4, 128\) = pre_seq_len x 2 layers") as error:
        llm.add_lora("wrong", wrong)
    assert "\n" not in str(error.value) and "wrong" not in llm.engine.loras
