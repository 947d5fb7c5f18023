"""Knowledge-retention benchmark: a synthetic world, a tiny base pretrained on it, two adaptation tasks."""
