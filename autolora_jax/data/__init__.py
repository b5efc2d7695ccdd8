"""The downstream data sets of the paper (TFDS and an image folder), served through input_pipeline's interface.

* `sources`: which data set comes from where, its splits and the clear errors when it is not prepared;
* `transforms`: SPEC.md's per-data-set preprocessing (torchvision's rules, numpy random numbers);
* `dataset`: `ImageDataset`, the batches (deterministic order and augmentation, per-process rows,
  decoding in a thread pool).

`input_pipeline.create_dataset` is the entry point.
"""
