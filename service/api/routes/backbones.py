from fastapi import APIRouter

from service.api.auth import PredictCaller

from service.api.schemas import BackboneOut
from workers.backbones import BACKBONES

router = APIRouter(prefix="/v1/backbones", tags=["backbones"])


@router.get("")
def list_backbones(caller: PredictCaller) -> list[BackboneOut]:
    """Every backbone Graft knows, and whether its pretrained weights are on this machine."""
    return [BackboneOut(name=s.name, weights_available=s.weights_available(),
                        input_size=s.preprocessing.input_size, feature_dim=s.feature_dim,
                        weights_path=str(s.weights_path()))
            for s in BACKBONES.values()]
