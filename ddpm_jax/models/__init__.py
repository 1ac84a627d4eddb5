"""Networks for ddpm_jax (the paper's U-Net)."""
