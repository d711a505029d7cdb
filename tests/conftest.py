"Shared test settings: quiet plotting, no analytics, bounded threads, no downloads."
import os
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
os.environ.setdefault('DIFFSR_FAST', '1')
os.environ.setdefault('TQDM_DISABLE', '1')
os.environ.setdefault('DIFFSR_OFFLINE', '1')  # tests never download weights; the download path is tested with a stand-in
