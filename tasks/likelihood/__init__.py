"""The negative log-likelihood of a test set under a diffusion model, in bits/dim, as Improved
DDPM reports it: the full variational bound over the model's own timesteps, sharded on Ray."""
