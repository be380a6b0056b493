"""The data layer: NIfTI over fsspec (io), the dataset layout, preprocessing, the phantom
dataset, the OCTA-500 import and the stage datasets; see each module's docstring."""
