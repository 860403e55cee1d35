"""One config module per published experiment; ``python main.py --config=configs/<name>.py``.

Each module's ``get_config()`` returns a locked ``ml_collections.ConfigDict``
(``proxy_jax.config_utils.base_config``). A variant imports the config it varies
(``from configs import cars196_norm_softmax``) and changes what its paper changes.
"""
