"""diffsr_kit.bench: documented result keys, positive throughputs, timing helper and table layout."""
import pytest
import torch

from diffsr_kit.bench import bench_degrade, device_name, format_table, time_fn


def test_bench_degrade_keys_and_positive_numbers():
    res = bench_degrade(batch=4, size=32, device='cpu', repeats=1, warmup=0)
    assert set(res) == {'batched_img_per_s', 'per_image_img_per_s', 'device', 'batch', 'size'}
    assert res['batched_img_per_s'] > 0 and res['per_image_img_per_s'] > 0
    assert res['batch'] == 4 and res['size'] == 32
    assert isinstance(res['device'], str) and res['device']


def test_bench_degrade_classic_pipeline():
    res = bench_degrade(batch=2, size=16, pipeline='classic', device='cpu', repeats=1, warmup=0)
    assert res['batched_img_per_s'] > 0 and res['per_image_img_per_s'] > 0


def test_time_fn_counts_calls_and_orders_stats():
    calls = []
    r = time_fn(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and len(r['times']) == 4
    assert 0 <= r['min_s'] <= r['median_s']
    with pytest.raises(ValueError, match='repeats >= 1'):
        time_fn(lambda: None, repeats=0)


def test_device_name_cpu():
    assert f'({torch.get_num_threads()} threads)' in device_name('cpu')


def test_format_table_layout():
    rows = [{'pipeline': 'classic', 'batched_img_per_s': 1500.25, 'batch': 64},
            {'pipeline': 'shuffled', 'batched_img_per_s': 80.0, 'batch': 64}]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ['pipeline', 'batched_img_per_s', 'batch']
    assert set(lines[1].replace(' ', '')) == {'-'}
    assert lines[2].split() == ['classic', '1500.2', '64'] or lines[2].split() == ['classic', '1500.3', '64']
    # numbers are right-aligned: every row ends at the same column
    assert len({len(line) for line in lines[2:]}) == 1
