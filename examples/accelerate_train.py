"""distaccum with Hugging Face Accelerate: `accelerator.prepare` wraps the model, distaccum accumulates.

The model, optimizer and learning-rate scheduler come from `accelerator.prepare`; the Accumulator steps the
prepared optimizer and scheduler once per optimizer step (not `num_processes` times, as Accelerate's own
scheduler wrapper would) and refuses `Accelerator(gradient_accumulation_steps>1)`, which would accumulate a
second time. Same task and flags as examples/train.py, plus an exponential learning-rate decay.

    # one process
    accelerate launch --config_file launch/accelerate/single_process.yaml examples/accelerate_train.py
    python examples/accelerate_train.py

    # 2 processes on CPU: ACCELERATE_USE_CPU=1 is REQUIRED, else Accelerate sees no GPU, does not wrap the model
    # and never averages gradients (the Accumulator refuses to run then); launch/accelerate.sh sets it for you
    ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/accelerate/multi_cpu.yaml \
        examples/accelerate_train.py --global-batch-size 32 --micro-batch-size 8
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py

    # the DeepSpeed plugin (ZeRO 2 from launch/deepspeed/zero2.json; CPU too, but NOT with ACCELERATE_USE_CPU=1,
    # which drops DeepSpeed for DDP); needs pip install transformers
    accelerate launch --config_file launch/accelerate/deepspeed.yaml examples/accelerate_train.py
    accelerate launch --config_file launch/accelerate/deepspeed.yaml \
        --deepspeed_config_file launch/deepspeed/zero3.json examples/accelerate_train.py   # ZeRO 3

    # GPUs on one node, several nodes (set machine_rank / main_process_ip in the YAML, or use the flags)
    accelerate launch --config_file launch/accelerate/multi_gpu.yaml examples/accelerate_train.py
    accelerate launch --config_file launch/accelerate/multi_node.yaml --machine_rank $NODE_RANK \
        --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT examples/accelerate_train.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import task  # examples/task.py: the script's own directory is on sys.path under every launcher
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from distaccum import Accumulator, BatchPlan, dist


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch-size", type=int, default=32, help="samples per optimizer step, all ranks")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="samples per forward/backward per rank")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.05, help="initial SGD learning rate (momentum 0.9)")
    parser.add_argument("--lr-decay", type=float, default=0.9, help="learning rate x this after every step")
    parser.add_argument("--seed", type=int, default=0, help="model init and data seed")
    parser.add_argument("--save", type=Path, help="write the final state_dict here (main process, plain names)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    # Without a GPU, Accelerate's DeepSpeed path finds no backend of its own: it reports 1 process on every rank
    # (each would then read the same data) unless told to use gloo. Only there: one process must not get a group.
    deepspeed_on_cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available()
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if deepspeed_on_cpu else [])
    plan = BatchPlan(global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size)
    model = task.make_model(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    acc = Accumulator(model, optimizer, plan, scheduler=scheduler)
    accelerator.print(f"{plan}  distributed_type={accelerator.distributed_type} backend={acc.backend}")

    for step in range(args.steps):
        batches = task.micro_batches(
            step, plan.global_batch_size, plan.micro_batch_size, accelerator.process_index, plan.world_size, args.seed
        )
        for inputs, targets in batches:
            with acc.micro_step():
                outputs = model(inputs.to(accelerator.device))
                acc.backward(task.loss_fn(outputs, targets.to(accelerator.device)))  # not accelerator.backward
        assert acc.last_step is not None
        accelerator.print(f"step {step + 1:4d}/{args.steps}  loss {acc.last_step.loss:.6f}")

    if args.save is not None:
        state = accelerator.get_state_dict(model)  # every process: ZeRO 3 gathers its shards for it
        if accelerator.is_main_process:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, args.save)
            accelerator.print(f"saved weights to {args.save}")


if __name__ == "__main__":
    dist.run(main, parse_args())
