"""A pipeline-parallel decoding engine on ``torch.distributed``, with DéjàVu's microbatch swapping."""
