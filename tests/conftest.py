"Shared test settings: quiet plotting, no analytics, bounded threads."
import os
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
os.environ.setdefault('DIFFSR_FAST', '1')
os.environ.setdefault('TQDM_DISABLE', '1')
