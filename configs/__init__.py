"""Recipe configs (`python -m llava_jax.main --config=configs/<name>.py[:arg]`); installed as `llava_jax.configs`."""
