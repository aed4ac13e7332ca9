"""Classification with a pretrained encoder and class vectors, no fine-tuning: images (timm) and sentences.

Importing the package loads nothing heavy; each module imports torch, timm or sentence-transformers itself.
``docs/api.md`` maps the modules; ``python -m simsearch run|store|grid|distributed`` runs the commands.
"""

__version__ = "0.3.0"
