"""Commands around the trainer: sample (rejection sampling), demo (the R1 recipe in miniature), plan (peak memory
by part), export (adapter or merged model), plot (curves), bench (vs HF generate, vs TRL)."""
