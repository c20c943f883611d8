"""Data: readers, preprocessing, batch plans, packing, masking, the DataModule."""
