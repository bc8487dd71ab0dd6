"""Host time of each piece of ``KVStreamer.scatter`` on CPU tensors (the Python around torch and CUDA is the
same code as on a GPU). ``python bench/probes/scatter_host_cpu.py [--big]``; about 10 s."""
import sys

import torch

from scatter_pieces import pieces, print_rows

big = "--big" in sys.argv
torch.set_num_threads(1)
print_rows(pieces(torch.device("cpu"), big=big), f"CPU, {'4 MiB' if big else 'small'} one-layer chunks")
