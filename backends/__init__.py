"""What only one framework can do.

Import ``prefopt.backends.torch`` or ``prefopt.backends.jax`` directly; this package itself
imports neither framework.
"""
