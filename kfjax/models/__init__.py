"""The three networks of KernelFusion: patch diffusion, refinement U-Net, kernel INR."""
