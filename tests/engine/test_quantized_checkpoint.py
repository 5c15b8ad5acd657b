"""glmserve quantize: save -> load gives exactly the outputs of quantizing while loading."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from glmserve.config import EngineConfig
from glmserve.engine.checkpoint import open_checkpoint
from glmserve.engine.checkpoint.quantized import write_quantized
from glmserve.engine.device import Placement
from glmserve.engine.model_runner import ModelRunner
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.scheduler import ScheduledBatch
from glmserve.engine.sequence import Sequence

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": False,
    "eos_token_id": 2, "bos_token_id": 1,
}


def tiny_llama(folder):
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (256, 64), "model.norm.weight": (64,), "lm_head.weight": (256, 64)}
    for i in range(2):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (64,), f"{p}.post_attention_layernorm.weight": (64,),
                   f"{p}.self_attn.q_proj.weight": (64, 64), f"{p}.self_attn.k_proj.weight": (32, 64),
                   f"{p}.self_attn.v_proj.weight": (32, 64), f"{p}.self_attn.o_proj.weight": (64, 64),
                   f"{p}.mlp.gate_proj.weight": (128, 64), f"{p}.mlp.up_proj.weight": (128, 64),
                   f"{p}.mlp.down_proj.weight": (64, 128)}
    tensors = {k: torch.randn(*s, generator=g) * (1.0 if len(s) == 1 else 0.2) for k, s in shapes.items()}
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def prefill_logits(path, quantization) -> torch.Tensor:
    checkpoint = open_checkpoint(path)
    config = EngineConfig(dtype="bfloat16", quantization=quantization, kv_cache_memory=2**22)
    runner = ModelRunner(checkpoint.config, config, Placement.resolve(config), checkpoint, [2])
    runner.allocate_kv_cache(8)
    seq = Sequence("r", list(range(3, 40)), SamplingParams(temperature=0, prompt_logprobs=5))
    seq.block_table = [1, 2, 3]
    batch = ScheduledBatch([seq], [seq.num_tokens])
    result = runner.run(batch)
    first, entries = result.prompt_logprobs[0]
    targets = seq.prompt_token_ids[first:]
    return torch.tensor([e[t] for e, t in zip(entries, targets, strict=True)])


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_save_load_round_trip_is_identical(tmp_path, scheme):
    source = tiny_llama(tmp_path / "source")
    target = tmp_path / "quantized"
    write_quantized(open_checkpoint(source), target, scheme, 64, torch.bfloat16)
    assert (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file()
    assert open_checkpoint(target).format == "glmserve-quantized"
    on_load = prefill_logits(source, scheme)
    from_saved = prefill_logits(target, None)
    assert torch.equal(on_load, from_saved)
    assert np.isfinite(on_load.numpy()).all()


def test_quantized_file_is_smaller(tmp_path):
    source = tiny_llama(tmp_path / "source")
    size = write_quantized(open_checkpoint(source), tmp_path / "q", "int4", 64, torch.bfloat16)
    assert size < (source / "model.safetensors").stat().st_size / 2
