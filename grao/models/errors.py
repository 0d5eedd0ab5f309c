"""The one error of :mod:`grao.models`: a model or tokenizer the trainer cannot use."""


class ModelError(ValueError):
    """A model or tokenizer the trainer cannot use."""
