"""The porting command line (`detr-port`, or `python -m detr_jax.porting`): import PyTorch checkpoints, export ours.

  detr-port import SRC.pth OUT_DIR [--dilation]   # a detr_jax checkpoint directory
  detr-port export CKPT_DIR DST.pth                # official layout (CKPT_DIR may be a train.py workdir)
  detr-port export CKPT_DIR HF_DIR --hf            # a transformers from_pretrained directory, which
                                                   # pipeline("object-detection", model=HF_DIR) runs

Errors (a missing or corrupt file, a checkpoint that does not fit, a missing optional package:
`entry.user_errors`) end with one line on stderr and exit status 1; nothing is written.
"""

import argparse

from detr_jax import checkpoints, entry, families, porting
from detr_jax.porting import huggingface, torch_files


def main(argv=None) -> int:
  """Runs the command `argv` (default sys.argv[1:]); returns 0. Exits with status 1 on a user
  mistake (`entry.user_errors`), 2 on a usage error (argparse)."""
  parser = argparse.ArgumentParser(prog="detr-port", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  import_cmd = commands.add_parser("import", help="PyTorch/HF checkpoint -> detr_jax checkpoint directory")
  import_cmd.add_argument("source")
  import_cmd.add_argument("out_dir")
  import_cmd.add_argument("--dilation", action="store_true", help="the checkpoint is DC5")
  import_cmd.add_argument("--num_heads", type=int, default=8)
  export_cmd = commands.add_parser("export", help="detr_jax checkpoint directory or train.py workdir -> official .pth "
                                                  "(or, with --hf, a transformers from_pretrained directory)")
  export_cmd.add_argument("checkpoint_dir")
  export_cmd.add_argument("destination")
  export_cmd.add_argument("--hf", action="store_true", help="write transformers' layout (HF-ResNet backbone)")
  args = parser.parse_args(argv)
  with entry.user_errors():
    if args.command == "import":
      model, variables = porting.load_pytorch_checkpoint(args.source, dilation=args.dilation, num_heads=args.num_heads)
      families.save_model_dir(args.out_dir, model, variables, families.load_categories(args.source, model))
      print(f"Imported {families.describe(model)} into {args.out_dir}")
    else:
      if args.hf:   # before the checkpoint is read
        huggingface.export_libraries("--hf")
      model, variables = families.load_model(args.checkpoint_dir)
      family = families.of_model(model)
      if args.hf:
        data = checkpoints.read_data_config(args.checkpoint_dir) or {}   # a workdir's input size
        family.save_hf_pretrained(model, variables, args.destination,
                                  families.load_categories(args.checkpoint_dir, model), scale=data.get("scale", 1.0))
      else:
        torch_files.save_pytorch_checkpoint(family.to_pytorch_state_dict(variables), args.destination)
      print(f"Exported {args.checkpoint_dir} to {args.destination} ({'Hugging Face' if args.hf else 'official'} layout)")
  return 0
