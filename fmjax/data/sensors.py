"""Band tables of the sensors fmjax reads: EnMAP (SpectralEarth) and Sentinel-2.

EnMAP centre wavelengths are the public EnMAP spectral band table (EnMAP_Spectral_Bands_update,
VNIR B1-B91 then SWIR B92-B224, native order; the two detectors overlap at 902-993 nm, so the
list is not monotonic). SpectralEarth drops 22 water-absorption bands (1-based B127-B141 and
B161-B167) and keeps the other 202 in native order.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# --- EnMAP ---------------------------------------------------------------------------------------

ENMAP_NUM_BANDS = 224
ENMAP_NODATA = -32768  # L2A nodata value of the int16 reflectance*10000 product

_ENMAP_VNIR_NM = (  # B1-B91
    418.416, 424.043, 429.457, 434.686, 439.758, 444.699, 449.539, 454.306, 459.031, 463.730,
    468.411, 473.080, 477.744, 482.411, 487.087, 491.780, 496.497, 501.243, 506.020, 510.829,
    515.672, 520.551, 525.467, 530.424, 535.422, 540.463, 545.551, 550.687, 555.873, 561.112,
    566.405, 571.756, 577.166, 582.636, 588.171, 593.773, 599.446, 605.193, 611.017, 616.923,
    622.921, 628.987, 635.112, 641.294, 647.537, 653.841, 660.207, 666.637, 673.131, 679.691,
    686.319, 693.014, 699.780, 706.617, 713.524, 720.501, 727.545, 734.654, 741.826, 749.060,
    756.353, 763.703, 771.108, 778.567, 786.078, 793.639, 801.249, 808.905, 816.608, 824.355,
    832.145, 839.976, 847.847, 855.757, 863.703, 871.683, 879.693, 887.729, 895.789, 903.870,
    911.968, 920.081, 928.204, 936.335, 944.470, 952.608, 960.748, 968.892, 977.037, 985.186,
    993.338)
_ENMAP_SWIR_NM = (  # B92-B224
    901.961, 911.571, 921.320, 931.203, 941.218, 951.360, 961.628, 972.016, 982.523,
    993.144, 1003.880, 1014.720, 1025.660, 1036.700, 1047.840, 1059.070, 1070.390, 1081.780,
    1093.260, 1104.810, 1116.430, 1128.100, 1139.840, 1151.620, 1163.440, 1175.300, 1187.200,
    1199.110, 1211.050, 1223.000, 1234.970, 1246.940, 1258.930, 1270.920, 1282.920, 1294.910,
    1306.900, 1318.880, 1330.850, 1342.820, 1354.760, 1366.690, 1378.600, 1390.480, 1461.100,
    1472.740, 1484.340, 1495.890, 1507.400, 1518.870, 1530.290, 1541.670, 1553.010, 1564.300,
    1575.550, 1586.760, 1597.910, 1609.020, 1620.090, 1631.110, 1642.070, 1653.000, 1663.870,
    1674.700, 1685.470, 1696.200, 1706.870, 1717.500, 1728.080, 1738.600, 1749.080, 1759.510,
    1939.140, 1948.690, 1958.200, 1967.660, 1977.080, 1986.450, 1995.790, 2005.080, 2014.330,
    2023.540, 2032.700, 2041.830, 2050.920, 2059.960, 2068.970, 2077.930, 2086.860, 2095.740,
    2104.590, 2113.400, 2122.170, 2130.900, 2139.600, 2148.260, 2156.880, 2165.470, 2174.020,
    2182.530, 2191.010, 2199.450, 2207.860, 2216.240, 2224.580, 2232.890, 2241.160, 2249.400,
    2257.610, 2265.790, 2273.930, 2282.040, 2290.120, 2298.170, 2306.190, 2314.170, 2322.130,
    2330.050, 2337.940, 2345.810, 2353.640, 2361.440, 2369.210, 2376.950, 2384.660, 2392.340,
    2400.000, 2407.620, 2415.210, 2422.780, 2430.320, 2437.820, 2445.300)

ENMAP_WAVELENGTHS_NM = np.array(_ENMAP_VNIR_NM + _ENMAP_SWIR_NM, np.float64)  # [224]
ENMAP_BAND_NAMES = tuple(f"B{i}" for i in range(1, ENMAP_NUM_BANDS + 1))
ENMAP_DETECTORS = ("VNIR",) * len(_ENMAP_VNIR_NM) + ("SWIR",) * len(_ENMAP_SWIR_NM)

# 1-based EnMAP bands SpectralEarth drops (water vapour absorption around 1400 nm and 1900 nm).
SPECTRALEARTH_DROPPED_BANDS = tuple(range(127, 142)) + tuple(range(161, 168))
SPECTRALEARTH_BAND_INDICES = tuple(  # 0-based indices into the 224 EnMAP bands, native order
    i for i in range(ENMAP_NUM_BANDS) if i + 1 not in SPECTRALEARTH_DROPPED_BANDS)
SPECTRALEARTH_NUM_BANDS = len(SPECTRALEARTH_BAND_INDICES)  # 202

# Indices into the 202 kept bands that make a true-colour picture (red ~ 642 nm, green ~ 550 nm,
# blue ~ 468 nm), as used by SpectralEarth's visualisations.
RGB_BANDS = (43, 28, 10)


def enmap_wavelengths(kept_only: bool = True) -> np.ndarray:
  """EnMAP centre wavelengths in nm: the 202 SpectralEarth bands, or all 224 bands."""
  if kept_only:
    return ENMAP_WAVELENGTHS_NM[list(SPECTRALEARTH_BAND_INDICES)].copy()
  return ENMAP_WAVELENGTHS_NM.copy()


# --- Sentinel-2 MSI ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Band:
  name: str
  wavelength_nm: float  # central wavelength (Sentinel-2A)
  resolution_m: int  # native ground sampling distance


SENTINEL2_BANDS = (
    Band("B1", 442.7, 60), Band("B2", 492.4, 10), Band("B3", 559.8, 10), Band("B4", 664.6, 10),
    Band("B5", 704.1, 20), Band("B6", 740.5, 20), Band("B7", 782.8, 20), Band("B8", 832.8, 10),
    Band("B8A", 864.7, 20), Band("B9", 945.1, 60), Band("B10", 1373.5, 60),
    Band("B11", 1613.7, 20), Band("B12", 2202.4, 20),
)
SENTINEL2_L1C_BANDS = tuple(b.name for b in SENTINEL2_BANDS)  # 13 bands
SENTINEL2_L2A_BANDS = tuple(n for n in SENTINEL2_L1C_BANDS if n != "B10")  # 12 bands (no cirrus)


def sentinel2_wavelengths(bands: tuple[str, ...] = SENTINEL2_L1C_BANDS) -> np.ndarray:
  """Central wavelengths (nm) of the named Sentinel-2 bands, in the order given."""
  by_name = {b.name: b for b in SENTINEL2_BANDS}
  unknown = [n for n in bands if n not in by_name]
  if unknown:
    raise ValueError(f"unknown Sentinel-2 bands {unknown}; valid: {list(by_name)}")
  return np.array([by_name[n].wavelength_nm for n in bands], np.float64)


def wavelengths(sensor: str, num_bands: int | None = None) -> np.ndarray:
  """Band wavelengths for a sensor name as stored in records ('enmap', 'sentinel2_l1c', ...)."""
  tables = {
      "enmap": lambda: enmap_wavelengths(kept_only=True),
      "enmap_full": lambda: enmap_wavelengths(kept_only=False),
      "sentinel2_l1c": lambda: sentinel2_wavelengths(SENTINEL2_L1C_BANDS),
      "sentinel2_l2a": lambda: sentinel2_wavelengths(SENTINEL2_L2A_BANDS),
  }
  if sensor not in tables:
    raise ValueError(f"unknown sensor {sensor!r}; valid: {sorted(tables)}")
  table = tables[sensor]()
  if num_bands is not None and num_bands != len(table):
    raise ValueError(f"sensor {sensor!r} has {len(table)} bands, not {num_bands}")
  return table
