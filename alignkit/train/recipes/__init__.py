"""One module per recipe; `alignkit.train.registry` maps names to them."""
