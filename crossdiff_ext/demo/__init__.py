"""The demonstrations on top of the core: a toy language and model pair, planted dictionaries with known ground
truth, the paper's finding in miniature, and the demo job (`crossdiff demo`). Nothing in the core imports this
package."""
