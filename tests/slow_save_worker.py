"""Run a command-line tool whose saves pause after the first file (run in a child process).

    python tests/slow_save_worker.py reshard|convert_hf|tiny ARGS...

`torch.save` and safetensors' `save_file` write their file, print "saved"
and then sleep, so that a test can interrupt the tool in the middle of
writing its output, at a moment it can see.
"""

import sys
import time

import safetensors.torch
import torch

real_torch_save, real_save_file = torch.save, safetensors.torch.save_file


def pause_after(save):
    def paused(*args, **kwargs):
        save(*args, **kwargs)
        print("saved", flush=True)
        time.sleep(120)

    return paused


torch.save = pause_after(real_torch_save)
safetensors.torch.save_file = pause_after(real_save_file)

tool, argv = sys.argv[1], sys.argv[2:]
if tool == "reshard":
    from llama.reshard import main
elif tool == "convert_hf":
    from llama.convert_hf import main
else:
    from llama.tiny import main
sys.exit(main(argv))
