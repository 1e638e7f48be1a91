"""The VIRTUE network: SAM2 region branch -> connector -> Qwen2-VL backbone -> last-token embedding."""
