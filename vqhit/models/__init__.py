"""Networks: attention, the HiT generator, and (for the tokenizer) encoder, quantizer, decoder, discriminator."""


def model_class(task: str):
    """The network a training task trains: the HiT generator ("gan") or the VQ-HiT tokenizer ("vqhit")."""
    from .hit import HiTGenerator
    from .vqhit import VQHiT

    return {"gan": HiTGenerator, "vqhit": VQHiT}[task]
