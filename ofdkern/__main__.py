"""`python -m ofdkern`: versions and the backend matrix of this machine."""
import platform

import torch

import ofdkern


def main() -> None:
    print(f"ofdkern {ofdkern.__version__}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
          f"python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'backend':<10} {'built':<6} {'available on':<14} reason")
    for name, entry in ofdkern.backend_status().items():
        devices = ",".join(entry["devices"]) or "-"
        print(f"{name:<10} {str(entry['built']):<6} {devices:<14} {entry['reason'] or ''}")
    cpu = ofdkern.backend_status()["cpu"]
    if cpu["built"]:
        threads = (f"{torch.get_num_threads()} threads (torch.set_num_threads)" if cpu["parallel"]
                   else "1 thread (the extension was built without OpenMP)")
        print(f"cpu kernels: {threads}")


if __name__ == "__main__":
    main()
