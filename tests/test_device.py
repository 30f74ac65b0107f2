"""--device as an operator types it: a GPU this machine lacks is refused saying what to give."""

import pytest
import torch

from cxr_batch.device import DeviceError, pick_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_on_a_machine_without_one_says_to_use_the_cpu():
    # said only "no CUDA GPU is available on this machine", not what to give instead
    with pytest.raises(DeviceError, match=r"use --device cpu \(or auto, which picks the CPU here\)"):
        pick_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_index_past_the_last_names_the_ones_there():
    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"give cuda:0 to cuda:{n - 1}"):
        pick_device(f"cuda:{n}")


def test_a_device_that_is_no_device_is_named():
    with pytest.raises(DeviceError, match="expected auto, cpu, cuda or cuda:N"):
        pick_device("gpu")
