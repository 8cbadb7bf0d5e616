"""Input side. Imports flow one way: sources -> {shapes, folder, tfds}; pipeline -> {sources,
augment}.

* shapes.py: the embedded `shapes` dataset (`ShapesSource`, `SHAPE_CLASSES`, `max_area`).
* folder.py: image folders (`FolderSource`, `list_images`, `decode_image`, `IMAGE_EXTENSIONS`).
* tfds.py: a prepared TFDS split with random access (`TfdsSource`).
* sources.py: `make_source(config, split)`, the one place a config picks one of them (`SOURCES`).
* augment.py: host crops (DINO's `MultiCrop`, the linear probe's `RandomResizedCropFlip`,
  `eval_transform`), device crops and photometric ops (`device_augment`), `normalize`.
* pipeline.py: grain pipelines: multi-crop training batches (`train_dataset`), the linear probe's
  (`probe_train_batches`), padded evaluation batches (`eval_batches`), `global_batch`.
"""
