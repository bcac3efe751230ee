"""A small built-in calibration text (original prose, written for modadapt) for the presets, so
that `modadapt analyze tiny-llama` runs offline without --data."""

DEFAULT_TEXT = """\
A transformer reads a sequence of tokens and passes it through a stack of layers. Each layer lets
every token look at the others through attention, then transforms each token on its own with a
small feed-forward network. The result of a layer is added to its input, so a token that a layer
leaves alone simply keeps the value it had. That residual path is what makes skipping possible.

Not every token needs every layer. Punctuation, repeated words and the middle of a long number are
often settled early, while a rare name or the word that decides the meaning of a sentence may need
the full depth of the network. Mixture-of-Depths gives each chosen layer a router: a tiny scoring
function that looks at each token and decides whether the layer should process it. Tokens that are
skipped cost nothing at that layer, and they write no keys or values into the cache.

Which layers should be converted? A layer whose attention maps have low rank treats many tokens in
the same way: their rows of the attention map are nearly copies of each other. Removing some of
those tokens from the layer loses little. A layer whose maps have high rank keeps many distinct
patterns alive and is a poor place to skip. Measuring the rank on a few dozen inputs is cheap, and
it turns a guess into a decision that can be checked and repeated.

The first layer is special and is never converted. It builds the cache and the masks that the
later layers rely on, and its outputs feed everything else. The last layers, close to the output,
are often sensitive too, but whether they are is a question for the measurement, not for a rule.

Calibration text does not need to be large. It needs to look like the inputs the model will see:
ordinary sentences for a language model, ordinary pictures for a vision model. The analysis runs
the model without gradients, one batch at a time, and keeps only a handful of numbers per layer.
The report records the text it read, its hash, the seed and the versions of the libraries, so that
a colleague can run the same command and get the same selection.

Cheaper signals exist as well. If the hidden state that leaves a layer points in nearly the same
direction as the one that entered it, the layer changed little, and tokens could skip it at small
cost. Cosine similarity between a layer's input and output is one forward pass and no large maps,
which makes it a useful second opinion next to the rank of the attention maps.

Once the layers are chosen, the model is converted in place. Its weights stay where they are, its
generate method still works, and at full capacity it computes exactly what the dense model did.
Fine-tuning then teaches the routers which tokens matter, and the saving in computation grows as
the capacity is lowered. Every number in the final report can be traced back to a command.
"""
