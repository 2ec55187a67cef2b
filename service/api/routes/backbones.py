from fastapi import APIRouter

from service.api.auth import PredictCaller

from service.api.schemas import BackboneOut
from workers.backbones import BACKBONES, BackboneSpec, WeightsUnavailable

router = APIRouter(prefix="/v1/backbones", tags=["backbones"])


@router.get("")
def list_backbones(caller: PredictCaller) -> list[BackboneOut]:
    """Every backbone Graft knows, and whether its pretrained weights are on this machine."""
    return [BackboneOut(name=s.name, weights_available=s.weights_available(),
                        input_size=s.preprocessing.input_size, feature_dim=s.feature_dim,
                        weights_path=_weights_path(s))
            for s in BACKBONES.values()]


def _weights_path(spec: BackboneSpec) -> str | None:
    try:
        return str(spec.weights_path())
    except WeightsUnavailable:  # a backbone whose weights package is not installed
        return None
