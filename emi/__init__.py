"""emi: distributed training for Emotional Mimicry Intensity estimation from video."""

EMI_EMOTIONS = ("Admiration", "Amusement", "Determination", "Empathic Pain", "Excitement", "Joy")

__version__ = "0.1.0"
