"""Training: the loop and its run folder, the data and the tokenizer.

- `config.py`: `TrainConfig`, the settings (the command line's options);
- `recipes.py`: `finetune` (an adapter on instructions) and `pretrain` (a small base);
- `preflight.py`: what a finetune run decides before the base loads, decided once (`FinetunePlan`);
- `bases.py`: the base model and tokenizer a command loads (HF, Meta, GGUF);
- `trainer.py`: the loop (`Trainer`), shared by both;
- `schedule.py`: learning rates, the data order of each step, parameter groups;
- `distributed.py`: torchrun's process group and the collectives the loop needs;
- `run_folder.py`: the run's files, its lock, checkpoints, metrics, exact resume;
- `data.py`: instruction records, the Alpaca prompt, tokenization, padding and packing;
- `multimodal.py`: records with pictures and the multi-modal adapter's set-up;
- `tokenizer.py`: the sentencepiece tokenizer.
"""

from llama_adapter_fast.training.bases import load_base, load_tokenizer
from llama_adapter_fast.training.config import TrainConfig
from llama_adapter_fast.training.recipes import finetune, pretrain
from llama_adapter_fast.training.tokenizer import Tokenizer
from llama_adapter_fast.training.trainer import Trainer, TrainResult

__all__ = ["TrainConfig", "finetune", "pretrain", "load_base", "load_tokenizer", "Tokenizer", "Trainer",
           "TrainResult"]
