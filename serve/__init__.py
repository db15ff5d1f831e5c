"""The Ray Serve application that answers video reasoning segmentation requests over HTTP."""
