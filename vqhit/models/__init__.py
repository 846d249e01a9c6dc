"""Networks: attention, the HiT generator, and (for the tokenizer) encoder, quantizer, decoder, discriminator."""
