"""Build a tiny random NemotronH (Mamba2 + attention + MLP) with a local BPE tokenizer.

    python -m sglang_marconi.cpu_serving.tiny_model --out /tmp/tiny-nemotron-h

Everything is made here, deterministically (fixed seeds), with no download:

* tokenizer: a byte-level BPE (``tokenizers``) trained on generated text,
  saved as a ``PreTrainedTokenizerFast`` (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2);
* model: ``transformers.NemotronHForCausalLM`` with random weights, saved with
  ``save_pretrained`` (safetensors, bfloat16).

``config.json`` is then adjusted for SGLang 0.5.23's own ``NemotronHConfig``:
transformers 5.19 writes ``layers_block_type`` as ``linear_attention`` /
``full_attention`` / ``mlp`` while SGLang accepts ``mamba`` / ``attention`` /
``mlp`` / ``moe``; SGLang reads ``mamba_n_groups`` (default 8), not
``n_groups``; and its ``mamba_d_conv`` / ``mamba_expand`` /
``mamba_chunk_size`` / ``mamba_conv_bias`` keys are written next to
transformers' names; ``time_step_limit`` (written as a ``{"__float__":
"Infinity"}`` object) is dropped, SGLang's default is the same ``(0, inf)``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Dict, List, Optional

DEFAULT_LAYERS = ["mamba", "mlp", "attention", "mlp", "mamba", "mlp"]

TINY_CONFIG: Dict = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    mamba_num_heads=8,
    mamba_head_dim=16,  # 8 * 16 = 2 * hidden (expand 2)
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    expand=2,
    chunk_size=64,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

#: Larger presets over TINY_CONFIG. "small" (hidden 512, 8 layers, ~25 M parameters)
#: makes a prefill cost real compute on a 2-core CPU (~220 ms for 300 tokens vs ~55 ms
#: for 32), so a load test can see what a cache hit saves; "tiny" prefill costs about
#: as much as the scheduler's own per-request overhead.
MODEL_PRESETS: Dict[str, Dict] = {
    "tiny": {},
    "small": dict(
        hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64, n_groups=2,
        layers_block_type=["mamba", "mlp", "mamba", "mlp", "attention", "mlp", "mamba", "mlp"],
    ),
}

_HF_TO_SGLANG_BLOCK = {
    "linear_attention": "mamba",
    "mamba": "mamba",
    "full_attention": "attention",
    "attention": "attention",
    "mlp": "mlp",
    "moe": "moe",
}

_WORDS = (
    "the a of to and in is it that for on with as was at by be this from or an are "
    "cache state prefix token model layer attention mamba hybrid server request "
    "branch checkpoint eviction utility recency flops memory tree node radix "
    "prompt reply system user assistant question answer shared context chat turn"
).split()


def training_text(seed: int = 0, lines: int = 4000) -> List[str]:
    rnd = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rnd.randint(4, 16)
        words = [rnd.choice(_WORDS) for _ in range(n)]
        if rnd.random() < 0.3:
            words.append(str(rnd.randint(0, 999)))
        out.append(" ".join(words) + rnd.choice([".", "?", "!", ","]))
    return out


def build_tokenizer(out_dir: Path, vocab_size: int = 512, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def fix_config_for_sglang(config_path: Path) -> Dict:
    cfg = json.loads(config_path.read_text())
    cfg["layers_block_type"] = [_HF_TO_SGLANG_BLOCK[b] for b in cfg["layers_block_type"]]
    mtp = cfg.get("mtp_layers_block_type")
    if isinstance(mtp, list):
        cfg["mtp_layers_block_type"] = [_HF_TO_SGLANG_BLOCK.get(b, b) for b in mtp]
    cfg.pop("hybrid_override_pattern", None)
    # transformers writes (0.0, inf) as [0.0, {"__float__": "Infinity"}]; SGLang's
    # default for a missing value is the same (0.0, inf)
    cfg.pop("time_step_limit", None)
    cfg["mamba_n_groups"] = cfg.get("n_groups", 1)
    cfg["mamba_d_conv"] = cfg.get("conv_kernel", 4)
    cfg["mamba_expand"] = cfg.get("expand", 2)
    cfg["mamba_chunk_size"] = cfg.get("chunk_size", 256)
    cfg["mamba_conv_bias"] = cfg.get("use_conv_bias", True)
    cfg["num_hidden_layers"] = len(cfg["layers_block_type"])
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def build(
    out_dir,
    seed: int = 0,
    layers: Optional[List[str]] = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    **overrides,
) -> Path:
    """Write the model + tokenizer to ``out_dir`` (skipped when already complete)."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    out = Path(out_dir)
    marker = out / ".complete"
    if marker.exists() and not overwrite:
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, vocab_size=overrides.get("vocab_size", TINY_CONFIG["vocab_size"]), seed=seed)

    kw = dict(TINY_CONFIG)
    kw.update(overrides)
    kw["layers_block_type"] = list(layers or kw.pop("layers_block_type", None) or DEFAULT_LAYERS)
    torch.manual_seed(seed)
    config = NemotronHConfig(**kw)
    model = NemotronHForCausalLM(config)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(str(out), safe_serialization=True)
    fix_config_for_sglang(out / "config.json")
    marker.write_text("ok\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--size", default="tiny", choices=sorted(MODEL_PRESETS))
    a = ap.parse_args(argv)
    path = build(a.out, seed=a.seed, dtype=a.dtype, overwrite=a.overwrite, **MODEL_PRESETS[a.size])
    print(path)


if __name__ == "__main__":
    main()
