"""Fine-tuning CogVLM2: LoRA / QLoRA / full fine-tuning on conversations about images or videos.

Sits on top of the library and imports downward (model, processing, checkpoint); nothing imports it
back. Needs the `finetune` extra (peft, accelerate, tensorboard). Files:

    data.py           datasets on disk (official layout, JSONL manifest), validated up front
    dataset.py        turn sampling and the per-rank, per-epoch data order
    packing.py        labelled examples -> one flat packed batch (no padding)
    objective.py      the loss as one module (what DeepSpeed / FSDP wrap)
    lora.py           peft LoRA: targets, peft-format save/load, unmerged serving, merging
    quant.py          QLoRA's 4-bit base (bitsandbytes)
    checkpointing.py  exactly-resumable checkpoints
    train.py          the training loop
    merge.py          merge-lora -> a checkpoint in the official layout
    cli.py            the `finetune` / `merge-lora` sub-commands
"""
