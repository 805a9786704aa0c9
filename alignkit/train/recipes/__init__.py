"""One module per recipe; `alignkit.registries.recipes` maps names to them."""
