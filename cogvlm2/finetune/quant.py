"""QLoRA's 4-bit base: every nn.Linear (lm_head excepted) swapped for a bitsandbytes NF4 Linear4bit.

The weights are quantized as each layer is moved to the device, so a bf16 model loaded on the CPU
never has to fit on the GPU unquantized. peft then puts LoRA layers on top of the Linear4bit modules
(its bitsandbytes LoRA layer); the adapter it trains is an ordinary adapter that merges into the
bf16 base like any other.
"""

from __future__ import annotations

import torch
from torch import nn

SKIP = ("lm_head",)  # as transformers' BitsAndBytesConfig: the output projection stays in full precision


def quantize_4bit(model: nn.Module, device: torch.device | str, compute_dtype: torch.dtype = torch.bfloat16,
                  quant_type: str = "nf4", double_quant: bool = True, skip: tuple[str, ...] = SKIP) -> nn.Module:
    """Replace the model's linears by 4-bit ones on `device`, in place; move everything else there too."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise RuntimeError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from e
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, bnb.nn.Linear4bit) or name in skip:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type=quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q.to(device))  # .to() quantizes
    return model.to(device)
