"""ParaBlock: communication-computation parallel block coordinate federated fine-tuning of LLMs."""

import logging

__version__ = "0.1.0"


class _OptionalKernels(logging.Filter):
    """Drops the lines torchao (the optional extra of ``model.frozen_dtype=int8/nf4``) logs at
    import in every process once installed, since transformers imports it at each model load:
    its GPU kernels' .so files that a CPU torch cannot load, and torch's deprecation notice
    for the enums it registers. They say nothing about the run and would break the one-line
    errors of ``parablock``; every other line of those loggers, and all of ParaBlock's, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return (
            not (msg.startswith("Failed to load ") and "torchao" in str(record.getMessage()))
            and "is an Enum subclass and is now natively supported" not in msg
        )


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_OptionalKernels())
