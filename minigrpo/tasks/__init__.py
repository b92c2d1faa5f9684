"""Where examples and scores come from: data sources, prompts, THE answer extractor, rewards, the arith task."""
