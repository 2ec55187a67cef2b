from fastapi import APIRouter

from service.api.auth import PredictCaller
from service.api.schemas import BackboneOut
from workers.backbones import BACKBONES, BackboneSpec, WeightsUnavailable, get_backbone
from workers.timm_backbones import cached_timm_backbones
from workers.training.top import supports_top_tuning

router = APIRouter(prefix="/v1/backbones", tags=["backbones"])


@router.get("")
def list_backbones(caller: PredictCaller) -> list[BackboneOut]:
    """Every backbone Graft knows here: the built-in ones, the operator's registered ones and the timm
    models whose weights are in the Hugging Face cache, each with whether its weights are on this machine."""
    names = list(BACKBONES)
    names += [n for n in cached_timm_backbones() if n not in names]
    return [_out(get_backbone(name)) for name in names]


def _out(spec: BackboneSpec) -> BackboneOut:
    try:
        path = spec.weights_path()
    except WeightsUnavailable:  # a backbone whose weights package is not installed
        path = None
    present = path is not None and path.is_file()
    registered = spec.timm.registered if spec.timm is not None else None
    return BackboneOut(name=spec.name, source=spec.source, weights_available=present,
                       input_size=spec.preprocessing.input_size, fixed_input_size=spec.fixed_input_size,
                       feature_dim=spec.feature_dim, fine_tune_top=supports_top_tuning(spec),
                       weights_path=str(path) if path is not None else None,
                       weights_bytes=path.stat().st_size if present else None,
                       timm_arch=spec.timm.arch if spec.timm is not None else None,
                       sha256=registered.sha256 if registered is not None else None)
