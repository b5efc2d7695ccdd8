"""The downstream data sets (TFDS, image folders, idx files), served through input_pipeline's interface.

* `sources`: which data set comes from where (the table of all data sets), its splits and the clear errors
  when it is not prepared;
* `folder`: image folders: your own images (`folder`) and the scanning Caltech-256 shares;
* `fashion_mnist`: Fashion-MNIST from TFDS or the original idx files;
* `transforms`: SPEC.md's per-data-set preprocessing (torchvision's rules, numpy random numbers);
* `dataset`: `ImageDataset`, the batches (deterministic order and augmentation, per-process rows,
  decoding in a thread pool).

`input_pipeline.create_dataset` is the entry point.
"""
