"""edgead: visual anomaly detection from training to the inspection line.

Importing ``edgead`` never imports torch: the station runtime needs only numpy, OpenCV and an
engine backend.
"""

__version__ = "0.1.0"
